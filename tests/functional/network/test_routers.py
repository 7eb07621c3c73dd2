"""Routers on network nodes and floating IPs, over the API down to the agents' dataplanes.

The agents run libvirt's test driver, so their dataplane is the recording one:
what a router's node holds is read back with ``network.router_state``.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    network_pb2,
    port_pb2,
    router_pb2,
    subnet_pb2,
)
from nubis.scheduler.v1 import scheduler_pb2

from services.client import rpc_errors
from services.common import tasks
from tests.functional.network.harness import SCHEDULER, NetCloud

R = router_pb2
F = floating_ip_pb2
NET_NODE = f"e-net-{uuid.uuid4().hex[:4]}"
COMPUTE_NODE = f"e-cmp-{uuid.uuid4().hex[:4]}"


def reason(exc: grpc.aio.AioRpcError) -> str:
    return rpc_errors.domain_error(exc, "network").reason


def meta(name: str) -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(name=name)


async def make_network(cloud: NetCloud, name: str, cidr: str, *, caller: str = "a_member",
                       external: bool = False) -> tuple[network_pb2.Network, subnet_pb2.Subnet]:
    api = cloud.api(caller)
    net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=meta(name), external=external)))
    sub = await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(
        subnet=subnet_pb2.Subnet(meta=meta(f"{name}-v4"), network_id=net.meta.id, cidr=cidr,
                                 dhcp_enabled=not external)))
    return net, sub


async def router_state(cloud: NetCloud, node: str,
                       router_id: str) -> tasks_pb2.RealizedRouter | None:
    answer = await cloud.ask(node, tasks.ROUTER_STATE,
                             tasks_pb2.RouterStateRequest(router_id=router_id))
    found = [router for router in answer.routers if router.router_id == router_id]
    return found[0] if found else None


async def set_network_nodes(cloud: NetCloud, disabled: bool) -> list[str]:
    """Disable (or enable again) every network node; returns their names."""
    listed = await cloud.world.call(SCHEDULER, "ListNodes", scheduler_pb2.ListNodesRequest(
        filter="network_node=true"), "cloud_admin")
    assert isinstance(listed, scheduler_pb2.ListNodesResponse)
    for node in listed.nodes:
        await cloud.world.call(SCHEDULER, "UpdateNode", scheduler_pb2.UpdateNodeRequest(
            name=node.name, settings=scheduler_pb2.NodeSettings(
                disabled=disabled, disabled_reason="router test" if disabled else ""),
            update_mask=field_mask_pb2.FieldMask(paths=["disabled", "disabled_reason"])),
            "cloud_admin")
    return [node.name for node in listed.nodes]


@pytest.fixture(scope="module")
async def nodes(cloud: NetCloud) -> list[str]:
    await cloud.start_agent(COMPUTE_NODE)
    await cloud.start_agent(NET_NODE, network_node=True)
    return [COMPUTE_NODE, NET_NODE]


async def test_a_router_needs_a_network_node(cloud: NetCloud, nodes: list[str]) -> None:
    disabled = await set_network_nodes(cloud, True)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cloud.api().CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("r0"))))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason(refused.value) == "nubis.router.no_network_node"
    finally:
        await set_network_nodes(cloud, False)
    assert COMPUTE_NODE not in disabled


async def test_router_snat_and_floating_ip_dnat_on_the_network_node(
        cloud: NetCloud, nodes: list[str]) -> None:
    public, _ = await make_network(cloud, "e-public", "203.0.113.0/24",
                                           caller="cloud_admin", external=True)
    private, private_v4 = await make_network(cloud, "e-private", "10.20.0.0/24")
    api = cloud.api()
    made = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(
        meta=meta("edge"), external_gateway=R.ExternalGateway(network_id=public.meta.id))))
    assert made.state == R.Router.ACTIVE, made.fault
    assert made.node == ""  # the hosting node is for operators
    seen = await cloud.api("cloud_admin").GetRouter(R.GetRouterRequest(id=made.meta.id))
    hosts = await cloud.world.call(SCHEDULER, "GetNode", scheduler_pb2.GetNodeRequest(
        name=seen.node), "cloud_admin")
    assert isinstance(hosts, scheduler_pb2.Node) and hosts.network_node
    gateway_ip = made.external_gateway.external_fixed_ips[0].ip_address
    assert gateway_ip.startswith("203.0.113.")
    assert made.external_gateway.enable_snat

    routed = await api.AddRouterInterface(R.AddRouterInterfaceRequest(
        router_id=made.meta.id, subnet_id=private_v4.meta.id))
    assert [(i.subnet_id, i.ip_address) for i in routed.interfaces] == [
        (private_v4.meta.id, private_v4.gateway_ip)]
    interface_port = await api.GetPort(port_pb2.GetPortRequest(id=routed.interfaces[0].port_id))
    assert interface_port.device_owner == "network:router_interface"
    assert interface_port.device_id == made.meta.id
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await api.AddRouterInterface(R.AddRouterInterfaceRequest(
            router_id=made.meta.id, subnet_id=private_v4.meta.id))
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS

    carried = await cloud.ask(seen.node, tasks.NETWORK_STATE, tasks_pb2.NetworkStateRequest())
    bridges = {network.network_id: network.bridge for network in carried.networks}
    assert bridges.get(private.meta.id) and bridges.get(public.meta.id), bridges
    realized = await router_state(cloud, seen.node, made.meta.id)
    assert realized is not None
    assert {leg.bridge for leg in realized.legs} == {bridges[private.meta.id],
                                                     bridges[public.meta.id]}
    assert f"snat 10.20.0.0/24 to {gateway_ip}" in realized.nat_rules
    assert any(f"{private_v4.gateway_ip}/24" in leg.addresses for leg in realized.legs)

    guest = await api.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        meta=meta("guest"), network_id=private.meta.id)))
    fixed = guest.fixed_ips[0].ip_address
    fip = await api.CreateFloatingIp(F.CreateFloatingIpRequest(
        floating_ip=F.FloatingIp(floating_network_id=public.meta.id)))
    assert fip.state == F.FloatingIp.DOWN and fip.floating_ip_address.startswith("203.0.113.")
    assert fip.floating_ip_address != gateway_ip
    bound = await api.AssociateFloatingIp(F.AssociateFloatingIpRequest(
        id=fip.meta.id, port_id=guest.meta.id))
    assert (bound.port_id, bound.fixed_ip_address, bound.router_id) == (
        guest.meta.id, fixed, made.meta.id)
    assert bound.state == F.FloatingIp.ACTIVE
    realized = await router_state(cloud, seen.node, made.meta.id)
    assert realized is not None
    assert f"dnat {fip.floating_ip_address} to {fixed}" in realized.nat_rules
    assert f"snat {fixed} to {fip.floating_ip_address}" in realized.nat_rules

    # A second floating IP cannot take the same fixed IP.
    other = await api.CreateFloatingIp(F.CreateFloatingIpRequest(
        floating_ip=F.FloatingIp(floating_network_id=public.meta.id)))
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await api.AssociateFloatingIp(F.AssociateFloatingIpRequest(id=other.meta.id,
                                                                   port_id=guest.meta.id))
    assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(taken.value) == "nubis.floating_ip.fixed_ip_taken"

    # The router keeps its interface and gateway while they carry traffic.
    for call, request in (
            (api.DeleteRouter, R.DeleteRouterRequest(id=made.meta.id)),
            (api.RemoveRouterInterface, R.RemoveRouterInterfaceRequest(
                router_id=made.meta.id, subnet_id=private_v4.meta.id))):
        with pytest.raises(grpc.aio.AioRpcError) as kept:
            await call(request)
        assert kept.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    loose = await api.DisassociateFloatingIp(F.DisassociateFloatingIpRequest(id=fip.meta.id))
    assert (loose.port_id, loose.router_id, loose.state) == ("", "", F.FloatingIp.DOWN)
    realized = await router_state(cloud, seen.node, made.meta.id)
    assert realized is not None
    assert not any(rule.startswith("dnat") for rule in realized.nat_rules)
    for one in (fip, other):
        await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=one.meta.id))
    await api.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(
        router_id=made.meta.id, subnet_id=private_v4.meta.id))
    with pytest.raises(grpc.aio.AioRpcError) as gone_port:
        await api.GetPort(port_pb2.GetPortRequest(id=interface_port.meta.id))
    assert gone_port.value.code() == grpc.StatusCode.NOT_FOUND
    await api.DeleteRouter(R.DeleteRouterRequest(id=made.meta.id))
    assert await router_state(cloud, seen.node, made.meta.id) is None
    await api.DeletePort(port_pb2.DeletePortRequest(id=guest.meta.id))


async def test_floating_ip_needs_a_router_to_the_external_network(
        cloud: NetCloud, nodes: list[str]) -> None:
    public, _ = await make_network(cloud, "e-public-2", "198.51.100.0/24",
                                   caller="cloud_admin", external=True)
    lonely, _ = await make_network(cloud, "e-lonely", "10.30.0.0/24")
    api = cloud.api()
    guest = await api.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        meta=meta("lonely-guest"), network_id=lonely.meta.id)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=F.FloatingIp(floating_network_id=public.meta.id), port_id=guest.meta.id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(refused.value) == "nubis.floating_ip.no_router"
    # The create failed whole: no floating IP is left holding an address.
    listed = await api.ListFloatingIps(F.ListFloatingIpsRequest(
        filter=f"floating_network_id={public.meta.id}"))
    assert not listed.floating_ips
    await api.CreateFloatingIp(F.CreateFloatingIpRequest(
        floating_ip=F.FloatingIp(floating_network_id=public.meta.id)))
    listed = await api.ListFloatingIps(F.ListFloatingIpsRequest(
        filter=f"floating_network_id={public.meta.id}"))
    assert len(listed.floating_ips) == 1 and not listed.floating_ips[0].port_id
    # Not from a private network.
    with pytest.raises(grpc.aio.AioRpcError) as private:
        await api.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=F.FloatingIp(floating_network_id=lonely.meta.id)))
    assert private.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Another project cannot associate A's floating IP, nor see it.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await cloud.api("b_admin").GetFloatingIp(F.GetFloatingIpRequest(
            id=listed.floating_ips[0].meta.id))
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=listed.floating_ips[0].meta.id))
    await api.DeletePort(port_pb2.DeletePortRequest(id=guest.meta.id))


async def test_quotas_of_routers_and_floating_ips(cloud: NetCloud, nodes: list[str]) -> None:
    world = cloud.world
    project = await world.make_project("e-quota")
    await world.make_user("e-quota-member", project, "member")
    world.tokens["e_quota"] = await world.login("e-quota-member", project)
    await world.stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project, limits={"routers": 1, "floating_ips": 1}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.routers", "limits.floating_ips"])),
        metadata=world.metadata("cloud_admin"))
    api = cloud.api("e_quota")
    public, _ = await make_network(cloud, "e-public-3", "192.0.2.0/24", caller="cloud_admin",
                                   external=True)
    first = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("one"))))
    with pytest.raises(grpc.aio.AioRpcError) as routers:
        await api.CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("two"))))
    assert routers.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(routers.value) == "nubis.quota.exceeded"
    fip = await api.CreateFloatingIp(F.CreateFloatingIpRequest(
        floating_ip=F.FloatingIp(floating_network_id=public.meta.id)))
    with pytest.raises(grpc.aio.AioRpcError) as fips:
        await api.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=F.FloatingIp(floating_network_id=public.meta.id)))
    assert fips.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Deleting gives the quota back, and the address back to the pool.
    await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=fip.meta.id))
    await api.DeleteRouter(R.DeleteRouterRequest(id=first.meta.id))
    again = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("three"))))
    await api.DeleteRouter(R.DeleteRouterRequest(id=again.meta.id))
    await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=(await api.CreateFloatingIp(
        F.CreateFloatingIpRequest(floating_ip=F.FloatingIp(
            floating_network_id=public.meta.id)))).meta.id))


async def test_a_router_left_in_error_is_realized_again(cloud: NetCloud,
                                                        nodes: list[str]) -> None:
    api = cloud.api()
    made = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("mended"))))
    assert made.state == R.Router.ACTIVE, made.fault

    def broken(record: R.Router) -> R.Router:
        # As a node that did not answer leaves it.
        record.state = R.Router.ERROR
        record.fault.reason = "nubis.agent.unavailable"
        return record

    await cloud.store.update(f"network/routers/{made.meta.id}", R.Router, broken)
    ends = time.monotonic() + 20
    while True:
        seen = await api.GetRouter(R.GetRouterRequest(id=made.meta.id))
        if seen.state == R.Router.ACTIVE:
            break
        assert time.monotonic() < ends, f"router still {R.Router.State.Name(seen.state)}"
        await asyncio.sleep(0.3)
    assert not seen.fault.reason
    await api.DeleteRouter(R.DeleteRouterRequest(id=made.meta.id))


async def test_a_router_whose_gateway_fails_is_not_made(cloud: NetCloud,
                                                        nodes: list[str]) -> None:
    private, _ = await make_network(cloud, "e-not-external", "10.60.0.0/24")
    api = cloud.api()
    before = await api.ListRouters(R.ListRoutersRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.CreateRouter(R.CreateRouterRequest(router=R.Router(
            meta=meta("no-uplink"), external_gateway=R.ExternalGateway(
                network_id=private.meta.id))))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = await api.ListRouters(R.ListRoutersRequest())
    assert [r.meta.id for r in after.routers] == [r.meta.id for r in before.routers]


async def test_racing_floating_ips_take_a_fixed_ip_once(cloud: NetCloud,
                                                         nodes: list[str]) -> None:
    public, _ = await make_network(cloud, "e-public-race", "100.64.0.0/24",
                                   caller="cloud_admin", external=True)
    private, private_v4 = await make_network(cloud, "e-private-race", "10.70.0.0/24")
    api = cloud.api()
    edge = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(
        meta=meta("race-edge"), external_gateway=R.ExternalGateway(network_id=public.meta.id))))
    await api.AddRouterInterface(R.AddRouterInterfaceRequest(router_id=edge.meta.id,
                                                             subnet_id=private_v4.meta.id))
    guest = await api.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        meta=meta("race-guest"), network_id=private.meta.id)))
    fips = [await api.CreateFloatingIp(F.CreateFloatingIpRequest(
        floating_ip=F.FloatingIp(floating_network_id=public.meta.id))) for _ in range(4)]
    outcomes = await asyncio.gather(*(api.AssociateFloatingIp(F.AssociateFloatingIpRequest(
        id=fip.meta.id, port_id=guest.meta.id)) for fip in fips), return_exceptions=True)
    won = [item for item in outcomes if isinstance(item, F.FloatingIp)]
    lost = [item for item in outcomes if isinstance(item, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 3, outcomes
    assert {reason(exc) for exc in lost} == {"nubis.floating_ip.fixed_ip_taken"}
    seen = await cloud.api("cloud_admin").GetRouter(R.GetRouterRequest(id=edge.meta.id))
    realized = await router_state(cloud, seen.node, edge.meta.id)
    assert realized is not None
    assert [rule for rule in realized.nat_rules if rule.startswith("dnat")] == [
        f"dnat {won[0].floating_ip_address} to {guest.fixed_ips[0].ip_address}"]
    for fip in fips:
        await api.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=fip.meta.id))
    await api.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(
        router_id=edge.meta.id, subnet_id=private_v4.meta.id))
    await api.DeleteRouter(R.DeleteRouterRequest(id=edge.meta.id))


async def test_router_updates_gateway_routes_admin_state_and_port_interfaces(
        cloud: NetCloud, nodes: list[str]) -> None:
    public, _ = await make_network(cloud, "e-public-upd", "100.65.0.0/24",
                                   caller="cloud_admin", external=True)
    private, private_v4 = await make_network(cloud, "e-private-upd", "10.80.0.0/24")
    api = cloud.api()
    made = await api.CreateRouter(R.CreateRouterRequest(router=R.Router(meta=meta("upd"))))
    assert not made.HasField("external_gateway")
    # An interface by port: a free port of the project, with one address.
    free = await api.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        meta=meta("router-leg"), network_id=private.meta.id,
        fixed_ips=[port_pb2.FixedIp(subnet_id=private_v4.meta.id, ip_address="10.80.0.254")])))
    routed = await api.AddRouterInterface(R.AddRouterInterfaceRequest(router_id=made.meta.id,
                                                                      port_id=free.meta.id))
    assert [(i.port_id, i.ip_address) for i in routed.interfaces] == [(free.meta.id,
                                                                        "10.80.0.254")]
    taken = await api.GetPort(port_pb2.GetPortRequest(id=free.meta.id))
    assert (taken.device_owner, taken.device_id) == ("network:router_interface", made.meta.id)

    def mask(*paths: str) -> field_mask_pb2.FieldMask:
        return field_mask_pb2.FieldMask(paths=list(paths))

    # Routes need a next hop on one of the router's subnets.
    with pytest.raises(grpc.aio.AioRpcError) as off_link:
        await api.UpdateRouter(R.UpdateRouterRequest(router=R.Router(
            meta=resource_pb2.ResourceMeta(id=made.meta.id),
            routes=[R.Route(destination="172.16.0.0/16", nexthop="192.168.9.9")]),
            update_mask=mask("routes")))
    assert off_link.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    routed = await api.UpdateRouter(R.UpdateRouterRequest(router=R.Router(
        meta=resource_pb2.ResourceMeta(id=made.meta.id),
        routes=[R.Route(destination="172.16.0.0/16", nexthop="10.80.0.9")],
        external_gateway=R.ExternalGateway(network_id=public.meta.id, enable_snat=False)),
        update_mask=mask("routes", "external_gateway")))
    assert routed.state == R.Router.ACTIVE, routed.fault
    assert routed.external_gateway.network_id == public.meta.id
    assert not routed.external_gateway.enable_snat
    seen = await cloud.api("cloud_admin").GetRouter(R.GetRouterRequest(id=made.meta.id))
    realized = await router_state(cloud, seen.node, made.meta.id)
    assert realized is not None
    assert not any(rule.startswith("snat") for rule in realized.nat_rules)
    assert "172.16.0.0/16 via 10.80.0.9" in realized.routes

    # Down: the node no longer carries it; up again: it does.
    down = await api.UpdateRouter(R.UpdateRouterRequest(router=R.Router(
        meta=resource_pb2.ResourceMeta(id=made.meta.id), admin_state_up=False),
        update_mask=mask("admin_state_up")))
    assert down.state == R.Router.DOWN
    assert await router_state(cloud, seen.node, made.meta.id) is None
    up = await api.UpdateRouter(R.UpdateRouterRequest(router=R.Router(
        meta=resource_pb2.ResourceMeta(id=made.meta.id), admin_state_up=True),
        update_mask=mask("admin_state_up")))
    assert up.state == R.Router.ACTIVE
    assert await router_state(cloud, seen.node, made.meta.id) is not None

    # Clearing the gateway deletes its port.
    gateway_port = up.external_gateway.port_id
    cleared = await api.UpdateRouter(R.UpdateRouterRequest(
        router=R.Router(meta=resource_pb2.ResourceMeta(id=made.meta.id)),
        update_mask=mask("external_gateway")))
    assert not cleared.HasField("external_gateway")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await api.GetPort(port_pb2.GetPortRequest(id=gateway_port))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    await api.UpdateRouter(R.UpdateRouterRequest(
        router=R.Router(meta=resource_pb2.ResourceMeta(id=made.meta.id)),
        update_mask=mask("routes")))
    await api.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(router_id=made.meta.id,
                                                                   port_id=free.meta.id))
    await api.DeleteRouter(R.DeleteRouterRequest(id=made.meta.id))
