"""A router made through the API, realized by a kernel-dataplane agent, carries real traffic.

A "node" namespace holds one agent (kernel dataplane inside it, flagged a
network node). Through the network service: an external network with its
subnet, a private network with DHCP, a router with a gateway on the first
and an interface on the second, a port bound on the node as compute binds
one. A "guest" namespace with the port's MAC on the private bridge gets its
address and default route (the router) from dnsmasq; an "upstream" namespace
on the external bridge holds the external subnet's gateway and no route to
the private subnet, so only NAT gets answers back. The guest reaches it seen
from the router's gateway address (SNAT); once a floating IP is associated,
upstream reaches the guest through it (DNAT) and the guest is seen from it.
Deleting the router leaves no namespace of it on the node. Runs as root;
skips otherwise.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import floating_ip_pb2, port_pb2, router_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client.lab import daemons
from services.common import network_devices
from tests.functional.network import netns
from tests.functional.network.harness import SCHEDULER, NetCloud, eventually

pytestmark = [
    pytest.mark.skipif(netns.missing_reason() is not None,
                       reason=netns.missing_reason() or ""),
    pytest.mark.slow, pytest.mark.timeout(180),
]

R, F = router_pb2, floating_ip_pb2
UPSTREAM = "203.0.113.1"
async def _active(cloud: NetCloud, port_id: str) -> port_pb2.Port | None:
    found = await cloud.api("cloud_admin").GetPort(port_pb2.GetPortRequest(id=port_id))
    return found if found.state == port_pb2.Port.ACTIVE else None


async def test_guest_reaches_out_through_snat_and_is_reached_through_its_floating_ip(
        cloud: NetCloud, tmp_path: Path) -> None:
    spaces = netns.Namespaces(tmp_path)
    started: list[daemons.Daemon] = []
    try:
        node_ns = spaces.make("node")
        name = f"e2e-router-{uuid.uuid4().hex[:4]}"
        started.append(cloud.agents.start(name, {
            "NUBIS_AGENT__DATAPLANE": "kernel", "NUBIS_AGENT__DATAPLANE_NETNS": node_ns,
            "NUBIS_AGENT__NETWORK_NODE": "true", "NUBIS_AGENT__STATE_DIR": str(tmp_path / name)}))
        assert (await cloud.wait_node(name)).dataplane == "kernel"

        public = await cloud.make_network("cloud_admin", external=True)
        await cloud.make_subnet(public.meta.id, "203.0.113.0/24", "cloud_admin",
                                gateway_ip=UPSTREAM)
        private = await cloud.make_network()
        private_v4 = await cloud.make_subnet(private.meta.id, "10.91.0.0/24", dhcp_enabled=True)
        api = cloud.api()
        router = await _router_on(cloud, name, public.meta.id)
        await api.AddRouterInterface(R.AddRouterInterfaceRequest(router_id=router.meta.id,
                                                                 subnet_id=private_v4.meta.id))
        router = await api.GetRouter(R.GetRouterRequest(id=router.meta.id))
        assert router.state == R.Router.ACTIVE, router.fault
        gateway_ip = router.external_gateway.external_fixed_ips[0].ip_address

        guest_port = await cloud.make_port(private.meta.id)
        await cloud.api("cloud_admin").BindPort(port_pb2.BindPortRequest(
            id=guest_port.meta.id, node=name, device_id=str(uuid.uuid4())))
        await eventually(functools.partial(_active, cloud, guest_port.meta.id), within=30)

        guest = spaces.attach_guest(node_ns, network_devices.bridge(private.meta.id), "guest",
                                    guest_port.mac_address)
        lease = spaces.dhcp(guest)
        assert lease["ip"] == guest_port.fixed_ips[0].ip_address
        assert lease["router"] == private_v4.gateway_ip
        netns.run("ip", "-n", guest, "route", "add", "default", "via", lease["router"])
        upstream = spaces.attach_guest(node_ns, network_devices.bridge(public.meta.id),
                                       "upstream", "fa:16:3e:7f:00:01")
        netns.run("ip", "-n", upstream, "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")

        assert netns.seen_from(upstream, guest, UPSTREAM, 8081) == gateway_ip

        fip = await api.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=F.FloatingIp(floating_network_id=public.meta.id),
            port_id=guest_port.meta.id))
        assert fip.state == F.FloatingIp.ACTIVE
        floating = fip.floating_ip_address
        assert netns.seen_from(guest, upstream, floating, 8082) == UPSTREAM
        assert netns.seen_from(upstream, guest, UPSTREAM, 8083) == floating

        await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=fip.meta.id))
        assert netns.seen_from(upstream, guest, UPSTREAM, 8084) == gateway_ip
        await api.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(
            router_id=router.meta.id, subnet_id=private_v4.meta.id))
        await api.DeleteRouter(R.DeleteRouterRequest(id=router.meta.id))
        assert router.meta.id not in netns.run("ip", "netns", "list").stdout
        await cloud.api("cloud_admin").UnbindPort(port_pb2.UnbindPortRequest(
            id=guest_port.meta.id))
    finally:
        for daemon in started:
            daemon.stop()
        spaces.remove_all()


async def _router_on(cloud: NetCloud, node: str, external_id: str) -> R.Router:
    """A router with a gateway placed on `node`: the other network nodes are disabled meanwhile."""
    listed = await cloud.world.call(SCHEDULER, "ListNodes", scheduler_pb2.ListNodesRequest(
        filter="network_node=true"), "cloud_admin")
    assert isinstance(listed, scheduler_pb2.ListNodesResponse)
    others = [shown.name for shown in listed.nodes if shown.name != node]

    async def disable(disabled: bool) -> None:
        for other in others:
            await cloud.world.call(SCHEDULER, "UpdateNode", scheduler_pb2.UpdateNodeRequest(
                name=other, settings=scheduler_pb2.NodeSettings(disabled=disabled),
                update_mask=field_mask_pb2.FieldMask(paths=["disabled"])), "cloud_admin")

    await disable(True)
    try:
        made: R.Router = await cloud.api().CreateRouter(R.CreateRouterRequest(router=R.Router(
            meta=resource_pb2.ResourceMeta(name="e2e-edge"),
            external_gateway=R.ExternalGateway(network_id=external_id))))
    finally:
        await disable(False)
    seen = await cloud.api("cloud_admin").GetRouter(R.GetRouterRequest(id=made.meta.id))
    assert seen.node == node
    return made
