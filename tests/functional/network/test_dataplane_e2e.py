"""Ports bound through the network service, realized by two agents' kernel dataplanes.

Two "node" namespaces joined by an underlay link hold one agent each (kernel
dataplane inside the namespace, its tunnel address on the underlay). A port
of one network is bound on each node through BindPort, as compute does while
booting; the network service sends each node the network with the other as
its VXLAN peer and its own port. A "guest" namespace with each port's MAC on
its node's bridge gets the port's address from that node's dnsmasq, and the
two guests reach each other across the tunnel. Unbinding the last port of a
node takes the network off it: no bridge, vxlan or DHCP namespace stays.
Runs as root; skips otherwise.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

import pytest
from nubis.network.v1 import port_pb2

from services.client.lab import daemons
from services.common import network_devices
from tests.functional.network import netns
from tests.functional.network.harness import NetCloud, eventually

pytestmark = [
    pytest.mark.skipif(netns.missing_reason() is not None,
                       reason=netns.missing_reason() or ""),
    pytest.mark.slow, pytest.mark.timeout(180),
]

UNDERLAY = ("192.168.79.1", "192.168.79.2")


async def _port_active(cloud: NetCloud, port_id: str) -> port_pb2.Port | None:
    port = await cloud.api("cloud_admin").GetPort(port_pb2.GetPortRequest(id=port_id))
    return port if port.state == port_pb2.Port.ACTIVE else None


def _holds(namespace: str, network_id: str) -> bool:
    links = netns.run("ip", "-n", namespace, "-o", "link", "show").stdout
    return network_devices.short_id(network_id) in links


async def test_bound_ports_reach_their_guests_across_nodes_and_unbinding_cleans_up(
        cloud: NetCloud, tmp_path: Path) -> None:
    spaces = netns.Namespaces(tmp_path)
    started: list[daemons.Daemon] = []
    try:
        node_ns = (spaces.make("node-a"), spaces.make("node-b"))
        spaces.link(node_ns[0], "underlay", node_ns[1], "underlay")
        for namespace, address in zip(node_ns, UNDERLAY, strict=True):
            netns.run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "underlay")
        names = tuple(f"e2e-{side}-{uuid.uuid4().hex[:4]}" for side in "ab")
        for name, namespace, address in zip(names, node_ns, UNDERLAY, strict=True):
            started.append(cloud.agents.start(name, {
                "NUBIS_AGENT__DATAPLANE": "kernel", "NUBIS_AGENT__DATAPLANE_NETNS": namespace,
                "NUBIS_AGENT__TUNNEL_ADDRESS": address,
                "NUBIS_AGENT__STATE_DIR": str(tmp_path / name)}))
        for name in names:
            shown = await cloud.wait_node(name)
            assert shown.dataplane == "kernel"

        net = await cloud.make_network()
        await cloud.make_subnet(net.meta.id, "10.79.0.0/24", dhcp_enabled=True)
        ports = [await cloud.make_port(net.meta.id) for _ in names]
        for port, name in zip(ports, names, strict=True):
            await cloud.api("cloud_admin").BindPort(port_pb2.BindPortRequest(
                id=port.meta.id, node=name, device_id=str(uuid.uuid4())))
        for port in ports:
            await eventually(functools.partial(_port_active, cloud, port.meta.id), within=30)

        bridge = network_devices.bridge(net.meta.id)
        guests = [spaces.attach_guest(namespace, bridge, f"guest-{i}", port.mac_address)
                  for i, (namespace, port) in enumerate(zip(node_ns, ports, strict=True))]
        for guest, port in zip(guests, ports, strict=True):
            assert spaces.dhcp(guest)["ip"] == port.fixed_ips[0].ip_address
        netns.ping(guests[0], ports[1].fixed_ips[0].ip_address, count=3)
        netns.ping(guests[1], ports[0].fixed_ips[0].ip_address, count=3)

        for port in ports:
            await cloud.api("cloud_admin").UnbindPort(port_pb2.UnbindPortRequest(
                id=port.meta.id))

        async def gone() -> bool:
            return not any(_holds(namespace, net.meta.id) for namespace in node_ns)

        await eventually(gone, within=30)
        dhcp = {network_devices.dhcp_namespace(net.meta.id, ns) for ns in node_ns}
        assert not dhcp & set(spaces.names())
    finally:
        for daemon in started:
            daemon.stop()
        spaces.remove_all()
