"""The router and port filter tasks through a real agent, as the network service sends them.

On libvirt's test driver the agent's routers are recorded (after the
networks they join are ensured; a leg into a network the node lacks is
FAILED_PRECONDITION) and its filters kept in memory, both read back through
their state tasks; a repeat changes nothing and removal forgets them. An
agent on the kernel dataplane inside a "node" namespace makes the router's
namespace there and removes it again.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import port_nft, router_plan
from services.common import errors, network_devices, tasks
from services.common.task_sender import TaskSender
from tests.functional import agent_harness
from tests.functional.network import netns

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def _send(sender: TaskSender, node: str, spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
                request: tasks.Req, deadline: float | None = None) -> tasks.Resp:
    return await sender.send(node, spec, request, operation_id=tasks.new_operation_id(),
                             deadline=deadline)


def _network(network_id: str, vni: int, cidr: str) -> tasks_pb2.EnsureNetworkRequest:
    return tasks_pb2.EnsureNetworkRequest(network_id=network_id, vni=vni, subnets=[
        tasks_pb2.DataplaneSubnet(id=f"subnet-{vni}", cidr=cidr, dhcp_enabled=False)])


def _router(router_id: str, internal: str, external: str) -> tasks_pb2.EnsureRouterRequest:
    return tasks_pb2.EnsureRouterRequest(
        router_id=router_id,
        interfaces=[tasks_pb2.RouterInterface(network_id=internal, address="10.66.0.1/24",
                                              mac_address="fa:16:3e:70:00:01")],
        gateway=tasks_pb2.RouterGateway(network_id=external, address="198.51.100.5/24",
                                        next_hop="198.51.100.1",
                                        mac_address="fa:16:3e:70:00:02", enable_snat=True),
        floating_ips=[tasks_pb2.RouterFloatingIp(floating_ip_address="198.51.100.20",
                                                 fixed_ip_address="10.66.0.5")])


async def test_routers_and_filters_through_an_agent_on_the_test_driver(
        agents: agent_harness.AgentLauncher, sender: TaskSender) -> None:
    node = f"l3-{uuid.uuid4().hex[:6]}"
    agents.start(node, env={"NUBIS_AGENT__NETWORK_NODE": "true"})
    await _send(sender, node, tasks.PING, tasks_pb2.PingRequest(), deadline=60)
    internal, external, router_id = (str(uuid.uuid4()) for _ in range(3))
    request = _router(router_id, internal, external)

    with pytest.raises(errors.FailedPrecondition) as refused:
        await _send(sender, node, tasks.ENSURE_ROUTER, request)
    assert refused.value.reason == "nubis.agent.network_not_realized"

    await _send(sender, node, tasks.ENSURE_NETWORK, _network(internal, 6101, "10.66.0.0/24"))
    await _send(sender, node, tasks.ENSURE_NETWORK, _network(external, 6102, "198.51.100.0/24"))
    made = await _send(sender, node, tasks.ENSURE_ROUTER, request)
    assert (made.dataplane, made.changed) == ("recording", True)
    assert made.namespace == network_devices.router_namespace(router_id)
    assert not (await _send(sender, node, tasks.ENSURE_ROUTER, request)).changed
    state = await _send(sender, node, tasks.ROUTER_STATE, tasks_pb2.RouterStateRequest())
    assert list(state.routers) == [router_plan.desired(request, "")]
    assert (await _send(sender, node, tasks.REMOVE_ROUTER,
                        tasks_pb2.RemoveRouterRequest(router_id=router_id))).changed
    state = await _send(sender, node, tasks.ROUTER_STATE,
                        tasks_pb2.RouterStateRequest(router_id=router_id))
    assert list(state.routers) == []

    port_id = str(uuid.uuid4())
    port_request = tasks_pb2.EnsurePortFilterRequest(
        port_id=port_id, mac_address="fa:16:3e:70:00:05", fixed_ips=["10.66.0.5"],
        port_security_enabled=True, network_id=internal, rules=[tasks_pb2.FilterRule(
            direction="ingress", ethertype="IPv4", protocol="tcp", port_range_min=22,
            port_range_max=22)])
    filtered = await _send(sender, node, tasks.ENSURE_PORT_FILTER, port_request)
    assert filtered.recorded and filtered.filter_name == port_nft.filter_name(port_id)
    assert (filtered.backend, filtered.filterref_xml) == ("nftables", "")
    assert "<filterref" not in filtered.interface_xml
    assert network_devices.tap(port_id) in filtered.interface_xml
    assert "tcp dport 22 accept" in filtered.filter_xml
    shown = await _send(sender, node, tasks.PORT_FILTER_STATE,
                        tasks_pb2.PortFilterStateRequest(port_id=port_id))
    assert shown.filter_xml == filtered.filter_xml
    assert (await _send(sender, node, tasks.REMOVE_PORT_FILTER,
                        tasks_pb2.RemovePortFilterRequest(port_id=port_id))).changed
    with pytest.raises(errors.NotFound):
        await _send(sender, node, tasks.PORT_FILTER_STATE,
                    tasks_pb2.PortFilterStateRequest(port_id=port_id))

    bad = tasks_pb2.EnsureRouterRequest(router_id="nope", floating_ips=[
        tasks_pb2.RouterFloatingIp(floating_ip_address="x", fixed_ip_address="10.0.0.5")])
    with pytest.raises(errors.InvalidArgument) as caught:
        await _send(sender, node, tasks.ENSURE_ROUTER, bad)
    assert {v.field for v in caught.value.violations} == {
        "router_id", "floating_ips", "floating_ips[0].floating_ip_address",
        "floating_ips[0].fixed_ip_address"}


@pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or "")
async def test_a_router_on_the_kernel_dataplane_through_an_agent(
        agents: agent_harness.AgentLauncher, sender: TaskSender, tmp_path: Path) -> None:
    spaces = netns.Namespaces(tmp_path)
    try:
        node_ns = spaces.make("node")
        node = f"l3k-{uuid.uuid4().hex[:6]}"
        agents.start(node, env={"NUBIS_AGENT__DATAPLANE": "kernel",
                                "NUBIS_AGENT__DATAPLANE_NETNS": node_ns,
                                "NUBIS_AGENT__STATE_DIR": str(tmp_path / "agent")})
        await _send(sender, node, tasks.PING, tasks_pb2.PingRequest(), deadline=60)
        internal, external, router_id = (str(uuid.uuid4()) for _ in range(3))
        await _send(sender, node, tasks.ENSURE_NETWORK, _network(internal, 6103, "10.66.0.0/24"))
        await _send(sender, node, tasks.ENSURE_NETWORK,
                    _network(external, 6104, "198.51.100.0/24"))

        made = await _send(sender, node, tasks.ENSURE_ROUTER,
                           _router(router_id, internal, external))

        assert (made.dataplane, made.changed) == ("kernel", True)
        assert made.namespace == network_devices.router_namespace(router_id, node_ns)
        assert made.namespace in spaces.names()
        state = await _send(sender, node, tasks.ROUTER_STATE,
                            tasks_pb2.RouterStateRequest(router_id=router_id))
        assert list(state.routers[0].nat_rules) == [
            "dnat 198.51.100.20 to 10.66.0.5", "snat 10.66.0.0/24 to 198.51.100.5",
            "snat 10.66.0.5 to 198.51.100.20"]
        assert (await _send(sender, node, tasks.REMOVE_ROUTER,
                            tasks_pb2.RemoveRouterRequest(router_id=router_id))).changed
        assert made.namespace not in spaces.names()
    finally:
        agents.stop_all()
        spaces.remove_all()
