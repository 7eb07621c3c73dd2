"""Network tasks: the node's libvirt networks and its L2 dataplane (bridges, VXLAN, DHCP).

ensure_network / remove_network carry the whole desired state of one
network, so a redelivered or repeated task converges to the same node state;
both lock the network id. network_state reads the dataplane back (and the
recording dataplane's commands), for tests and operators.
"""

from __future__ import annotations

from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import dataplane as dataplane_module
from services.agent import driver as driver_module
from services.agent.dataplane import plan
from services.agent.tasks import phases
from services.common import errors, network_devices, tasks


class ListNetworks(
    phases.AgentTask[tasks_pb2.ListNetworksRequest, tasks_pb2.ListNetworksResponse]
):
    """Every libvirt network of the node, running or only defined."""

    spec = tasks.LIST_NETWORKS

    def __init__(self, driver: driver_module.Driver) -> None:
        self._networks = driver.networks

    def execute(self, request: tasks_pb2.ListNetworksRequest,
                ctx: phases.Context) -> tasks_pb2.ListNetworksResponse:
        return tasks_pb2.ListNetworksResponse(names=self._networks.names())


class EnsureNetwork(
    phases.AgentTask[tasks_pb2.EnsureNetworkRequest, tasks_pb2.EnsureNetworkResponse]
):
    """Make the node carry the network: its bridge, VXLAN (flooding to the peers) and DHCP."""

    spec = tasks.ENSURE_NETWORK

    def __init__(self, dataplane: dataplane_module.Dataplane) -> None:
        self._dataplane = dataplane

    def check_arguments(self, request: tasks_pb2.EnsureNetworkRequest) -> None:
        plan.check(request)

    def lock_key(self, request: tasks_pb2.EnsureNetworkRequest) -> str:
        return _lock_key(request.network_id)

    def execute(self, request: tasks_pb2.EnsureNetworkRequest,
                ctx: phases.Context) -> tasks_pb2.EnsureNetworkResponse:
        changed = self._dataplane.ensure_network(request)
        return tasks_pb2.EnsureNetworkResponse(
            network_id=request.network_id, bridge=network_devices.bridge(request.network_id),
            vxlan=network_devices.vxlan(request.network_id),
            dhcp=any(s.dhcp_enabled and s.dhcp_address for s in request.subnets),
            dataplane=self._dataplane.kind, changed=changed,
        )


class RemoveNetwork(
    phases.AgentTask[tasks_pb2.RemoveNetworkRequest, tasks_pb2.RemoveNetworkResponse]
):
    """Remove the network's bridge, VXLAN, DHCP server and files; nothing there is done."""

    spec = tasks.REMOVE_NETWORK

    def __init__(self, dataplane: dataplane_module.Dataplane) -> None:
        self._dataplane = dataplane

    def check_arguments(self, request: tasks_pb2.RemoveNetworkRequest) -> None:
        _check_network_id(request.network_id)

    def lock_key(self, request: tasks_pb2.RemoveNetworkRequest) -> str:
        return _lock_key(request.network_id)

    def execute(self, request: tasks_pb2.RemoveNetworkRequest,
                ctx: phases.Context) -> tasks_pb2.RemoveNetworkResponse:
        changed = self._dataplane.remove_network(request.network_id)
        return tasks_pb2.RemoveNetworkResponse(network_id=request.network_id, changed=changed,
                                               dataplane=self._dataplane.kind)


class NetworkState(
    phases.AgentTask[tasks_pb2.NetworkStateRequest, tasks_pb2.NetworkStateResponse]
):
    """What the node's dataplane holds: one network, or every one it carries."""

    spec = tasks.NETWORK_STATE

    def __init__(self, dataplane: dataplane_module.Dataplane) -> None:
        self._dataplane = dataplane

    def check_arguments(self, request: tasks_pb2.NetworkStateRequest) -> None:
        if request.network_id:
            _check_network_id(request.network_id)

    def execute(self, request: tasks_pb2.NetworkStateRequest,
                ctx: phases.Context) -> tasks_pb2.NetworkStateResponse:
        ids = [request.network_id] if request.network_id else self._dataplane.network_ids()
        response = tasks_pb2.NetworkStateResponse(dataplane=self._dataplane.kind,
                                                  actions=self._dataplane.actions())
        for network_id in ids:
            state = self._dataplane.network_state(network_id)
            if state is not None:
                response.networks.append(state)
        return response


def _check_network_id(network_id: str) -> None:
    try:
        network_devices.short_id(network_id)
    except ValueError as exc:
        raise errors.InvalidArgument(
            "network_id must be a network's UUID",
            violations=[errors.FieldViolation("network_id", str(exc))]) from exc


def _lock_key(network_id: str) -> str:
    return f"network/{network_id}"


def all_tasks(driver: driver_module.Driver,
              dataplane: dataplane_module.Dataplane) -> list[phases.AgentTask[Any, Any]]:
    return [ListNetworks(driver), EnsureNetwork(dataplane), RemoveNetwork(dataplane),
            NetworkState(dataplane)]
