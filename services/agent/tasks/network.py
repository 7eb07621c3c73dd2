"""Network tasks: the node's libvirt networks (ports and bridges come with the network service)."""

from __future__ import annotations

from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import phases
from services.common import tasks


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


def all_tasks(driver: driver_module.Driver) -> list[phases.AgentTask[Any, Any]]:
    return [ListNetworks(driver)]
