"""Binding ports to nodes: the network realized on each node's agent, peers kept in step.

Agents run on libvirt's test driver, whose recording dataplane keeps what a
node holds; the tests ask each agent (`network.network_state`) rather than
trusting the service's own records.
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.network.v1 import ipam_pb2, port_pb2

from services.common import tasks
from services.network import binding, keys
from tests.functional.network.harness import NetCloud, code_of, eventually

NODES = ("bind-node-1", "bind-node-2")
TUNNELS = {"bind-node-1": "127.0.0.11", "bind-node-2": "127.0.0.12"}


@pytest.fixture(scope="module")
async def nodes(cloud: NetCloud) -> tuple[str, ...]:
    for name in NODES:
        if name not in cloud.nodes:
            cloud.agents.start(name, {"NUBIS_AGENT__TUNNEL_ADDRESS": TUNNELS[name]})
            cloud.nodes.append(name)
    for name in NODES:
        await cloud.wait_node(name)
    return NODES


async def _state(cloud: NetCloud, node: str, network_id: str) -> tasks_pb2.RealizedNetwork | None:
    reply = await cloud.ask(node, tasks.NETWORK_STATE,
                            tasks_pb2.NetworkStateRequest(network_id=network_id))
    found = [net for net in reply.networks if net.network_id == network_id]
    return found[0] if found else None


async def _bind(cloud: NetCloud, port: port_pb2.Port, node: str) -> port_pb2.Port:
    reply: port_pb2.Port = await cloud.call("BindPort", port_pb2.BindPortRequest(
        id=port.meta.id, node=node, device_id=f"server-{port.meta.id[:8]}"), "service")
    return reply


def _host(port: port_pb2.Port) -> str:
    return f"{port.mac_address},{port.fixed_ips[0].ip_address}"


async def test_bind_realizes_the_network_and_its_peers(cloud: NetCloud,
                                                       nodes: tuple[str, ...]) -> None:
    first, second = nodes
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.120.0.0/24", dhcp_enabled=True)
    one = await cloud.make_port(net.meta.id)
    two = await cloud.make_port(net.meta.id)

    bound = await _bind(cloud, one, first)
    assert bound.state == port_pb2.Port.ACTIVE and bound.node == first
    assert bound.binding_details["bridge"].startswith("nbr-")
    held = await _state(cloud, first, net.meta.id)
    assert held is not None and held.vni == net.segmentation_id
    assert not held.vxlan_peers
    assert any(entry.startswith(_host(one)) for entry in held.dhcp_hosts)
    # Binding again changes nothing.
    again = await _bind(cloud, one, first)
    assert again.state == port_pb2.Port.ACTIVE

    await _bind(cloud, two, second)
    there = await _state(cloud, second, net.meta.id)
    assert there is not None and list(there.vxlan_peers) == [TUNNELS[first]]
    assert any(entry.startswith(_host(two)) for entry in there.dhcp_hosts)
    here = await _state(cloud, first, net.meta.id)
    assert here is not None and list(here.vxlan_peers) == [TUNNELS[second]]

    # The last port leaving a node takes the network away; its peer forgets it.
    unbound = await cloud.call("UnbindPort", port_pb2.UnbindPortRequest(id=two.meta.id),
                               "service")
    assert unbound.state == port_pb2.Port.DOWN and not unbound.node
    assert await _state(cloud, second, net.meta.id) is None
    here = await _state(cloud, first, net.meta.id)
    assert here is not None and not here.vxlan_peers
    # Unbinding again is a no-op.
    await cloud.call("UnbindPort", port_pb2.UnbindPortRequest(id=two.meta.id), "service")


async def test_a_bind_cut_short_is_realized_by_the_loop(cloud: NetCloud,
                                                        nodes: tuple[str, ...]) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.121.0.0/24", dhcp_enabled=True)
    port = await cloud.make_port(net.meta.id)
    # What a replica that died right after the bind's commit leaves: BUILD, marked.
    await binding.bind_in_store(cloud.store, port_pb2.BindPortRequest(
        id=port.meta.id, node=nodes[0], device_id="server-cut-short"))

    async def active() -> port_pb2.Port | None:
        found: port_pb2.Port = await cloud.call("GetPort", port_pb2.GetPortRequest(
            id=port.meta.id))
        return found if found.state == port_pb2.Port.ACTIVE else None

    await eventually(active, within=20)
    held = await _state(cloud, nodes[0], net.meta.id)
    assert held is not None and any(entry.startswith(_host(port)) for entry in held.dhcp_hosts)


async def test_deleting_a_bound_port_updates_its_node(cloud: NetCloud,
                                                      nodes: tuple[str, ...]) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.122.0.0/24", dhcp_enabled=True)
    port = await cloud.make_port(net.meta.id)
    await _bind(cloud, port, nodes[1])
    assert await _state(cloud, nodes[1], net.meta.id) is not None
    await cloud.call("DeletePort", port_pb2.DeletePortRequest(id=port.meta.id, force=True),
                     "cloud_admin")
    assert await _state(cloud, nodes[1], net.meta.id) is None


async def test_only_services_bind(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    port = await cloud.make_port(net.meta.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("BindPort", port_pb2.BindPortRequest(
            id=port.meta.id, node=NODES[0], device_id="x"), "a_admin")
    assert code_of(caught.value) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_burst_of_binds_of_one_network_is_counted_and_realized_exactly(
        cloud: NetCloud, nodes: tuple[str, ...]) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.123.0.0/24", dhcp_enabled=True)
    ports = [await cloud.make_port(net.meta.id) for _ in range(24)]
    # Binds arriving together share transactions; a port that does not exist fails alone.
    missing = port_pb2.BindPortRequest(id=str(uuid.uuid4()), node=nodes[0], device_id="none")
    replies = await asyncio.gather(
        *(_bind(cloud, port, nodes[i % 2]) for i, port in enumerate(ports)),
        cloud.call("BindPort", missing, "service"), return_exceptions=True)
    assert code_of(replies[-1]) == grpc.StatusCode.NOT_FOUND
    assert all(isinstance(r, port_pb2.Port) and r.state == port_pb2.Port.ACTIVE
               for r in replies[:-1]), replies
    counted = await cloud.store.get(keys.attachments(net.meta.id), ipam_pb2.NetworkAttachments)
    assert dict(counted.value.node_ports) == {nodes[0]: 12, nodes[1]: 12}
    for index, node in enumerate(nodes):
        held = await _state(cloud, node, net.meta.id)
        assert held is not None
        for port in ports[index::2]:  # its own ports, and none of the other node's
            assert any(entry.startswith(_host(port)) for entry in held.dhcp_hosts)
        for port in ports[1 - index::2]:
            assert not any(entry.startswith(_host(port)) for entry in held.dhcp_hosts)
    for port in ports:
        await cloud.call("UnbindPort", port_pb2.UnbindPortRequest(id=port.meta.id), "service")
    assert await cloud.store.find(keys.attachments(net.meta.id),
                                  ipam_pb2.NetworkAttachments) is None
