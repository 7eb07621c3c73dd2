"""Authorization rows of nubis.network.v1.NetworkService.

Networks, subnets and ports belong to projects: readers read, members
create, change and delete them, and another project neither sees nor touches
a private one (NOT_FOUND). Only cloud-admins make a network shared or
external. Other nubis services (the `service` role) read networks and make,
read, change and delete ports for the project they name, and alone (with
cloud-admins) bind ports to nodes. IP availability is for project admins.
Security groups, routers and floating IPs are project resources the same way
(no network node runs in the matrix: a new router finds none, and the rows
on existing routers start from a router record without a node).
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    network_pb2,
    port_pb2,
    router_pb2,
    security_group_pb2,
    subnet_pb2,
)

from services.common import quota, resources
from services.common.settings import NetworkSettings, ServiceEndpoint
from services.common.store import Txn
from services.network import main
from tests.functional.authz.table import (
    DENIED,
    HIDDEN,
    OK,
    ResultCheck,
    Row,
    add_rows,
    add_service,
    expect,
    project_read,
    project_write,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.network.v1.NetworkService"
N, S, P = network_pb2, subnet_pb2, port_pb2
# No agent answers in the matrix: a bind gives the node half a second, then stays BUILD.
NODE = "authz-net-node"


async def _unlimited(world: World, project_id: str) -> None:
    """Every row makes networks, subnets and ports: no quota on them in the matrix."""
    async def body(txn: Txn) -> None:
        found = await txn.get(quota.quota_key(project_id), identity_pb2.Quota)
        record = found.value if found else identity_pb2.Quota(project_id=project_id)
        for name in ("networks", "subnets", "ports", "routers", "floating_ips",
                     "security_groups", "security_group_rules"):
            record.limits[name] = quota.UNLIMITED
        txn.put(quota.quota_key(project_id), record)

    await world.store.atomic(body)


async def _start(world: World) -> Service:
    for project_id in (world.project_a, world.project_b):
        await _unlimited(world, project_id)
    settings = world.settings.model_copy(update={"networking": NetworkSettings(
        realize_timeout=0.5, realize_interval=30.0)})
    return await start_service(main.build, world.store, settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


add_service(SERVICE, _start)


def _meta(*, name: str = "", project_id: str = "", id: str = "",
          description: str = "") -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(name=name, project_id=project_id, id=id,
                                     description=description)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _with_service(codes: dict[str, grpc.StatusCode],
                  service: grpc.StatusCode = OK) -> dict[str, grpc.StatusCode]:
    return {**codes, "service": service}


async def _network_in_a(world: World) -> N.Network:
    made = await world.call(SERVICE, "CreateNetwork", N.CreateNetworkRequest(network=N.Network(
        meta=_meta(name=_name("n"), project_id=world.project_a))), "cloud_admin")
    assert isinstance(made, N.Network)
    return made


async def _subnet_in_a(world: World) -> S.Subnet:
    net = await _network_in_a(world)
    made = await world.call(SERVICE, "CreateSubnet", S.CreateSubnetRequest(subnet=S.Subnet(
        network_id=net.meta.id, cidr="10.10.0.0/24", dhcp_enabled=True)), "cloud_admin")
    assert isinstance(made, S.Subnet)
    return made


async def _port_in_a(world: World) -> P.Port:
    subnet = await _subnet_in_a(world)
    made = await world.call(SERVICE, "CreatePort", P.CreatePortRequest(port=P.Port(
        meta=_meta(project_id=world.project_a), network_id=subnet.network_id)), "cloud_admin")
    assert isinstance(made, P.Port)
    return made


def _none_of_a(kind: str) -> ResultCheck:
    def check(world: World, caller: str, reply: message.Message) -> None:
        if caller == "b_admin":
            items = getattr(reply, kind)
            assert all(item.meta.project_id != world.project_a for item in items)

    return check


async def _get_network(world: World) -> message.Message:
    return N.GetNetworkRequest(id=(await _network_in_a(world)).meta.id)


async def _list_networks(world: World) -> message.Message:
    await _network_in_a(world)
    return N.ListNetworksRequest(filter="shared=false")


async def _create_network(world: World) -> message.Message:
    return N.CreateNetworkRequest(network=N.Network(meta=_meta(name=_name("n"))))


async def _create_shared(world: World) -> message.Message:
    return N.CreateNetworkRequest(network=N.Network(meta=_meta(name=_name("n")), shared=True))


async def _update_network(world: World) -> message.Message:
    net = await _network_in_a(world)
    return N.UpdateNetworkRequest(network=N.Network(meta=_meta(id=net.meta.id, name=_name("n"))),
                                  update_mask=field_mask_pb2.FieldMask(paths=["meta.name"]))


async def _delete_network(world: World) -> message.Message:
    return N.DeleteNetworkRequest(id=(await _network_in_a(world)).meta.id)


async def _availability(world: World) -> message.Message:
    return N.GetNetworkIpAvailabilityRequest(network_id=(await _subnet_in_a(world)).network_id)


async def _get_subnet(world: World) -> message.Message:
    return S.GetSubnetRequest(id=(await _subnet_in_a(world)).meta.id)


async def _list_subnets(world: World) -> message.Message:
    await _subnet_in_a(world)
    return S.ListSubnetsRequest(filter="ip_version=4")


async def _create_subnet(world: World) -> message.Message:
    net = await _network_in_a(world)
    return S.CreateSubnetRequest(subnet=S.Subnet(network_id=net.meta.id, cidr="10.11.0.0/24"))


async def _update_subnet(world: World) -> message.Message:
    subnet = await _subnet_in_a(world)
    return S.UpdateSubnetRequest(
        subnet=S.Subnet(meta=_meta(id=subnet.meta.id), dns_nameservers=["10.10.0.53"]),
        update_mask=field_mask_pb2.FieldMask(paths=["dns_nameservers"]))


async def _delete_subnet(world: World) -> message.Message:
    return S.DeleteSubnetRequest(id=(await _subnet_in_a(world)).meta.id)


async def _get_port(world: World) -> message.Message:
    return P.GetPortRequest(id=(await _port_in_a(world)).meta.id)


async def _list_ports(world: World) -> message.Message:
    await _port_in_a(world)
    return P.ListPortsRequest(filter="state=DOWN")


async def _create_port(world: World) -> message.Message:
    subnet = await _subnet_in_a(world)
    return P.CreatePortRequest(port=P.Port(meta=_meta(project_id=world.project_a),
                                           network_id=subnet.network_id))


async def _update_port(world: World) -> message.Message:
    port = await _port_in_a(world)
    return P.UpdatePortRequest(port=P.Port(meta=_meta(id=port.meta.id, name=_name("p"))),
                               update_mask=field_mask_pb2.FieldMask(paths=["meta.name"]))


async def _delete_port(world: World) -> message.Message:
    return P.DeletePortRequest(id=(await _port_in_a(world)).meta.id)


async def _watch_ports(world: World) -> message.Message:
    return P.WatchPortsRequest(options=resource_pb2.WatchOptions(initial_state=True))


async def _bind_port(world: World) -> message.Message:
    return P.BindPortRequest(id=(await _port_in_a(world)).meta.id, node=NODE,
                             device_id=str(uuid.uuid4()))


async def _unbind_port(world: World) -> message.Message:
    return P.UnbindPortRequest(id=(await _port_in_a(world)).meta.id)


_OPERATOR = expect(a_admin=DENIED, a_member=DENIED, a_reader=DENIED, b_admin=DENIED)

add_rows(
    Row(SERVICE, "GetNetwork", _get_network, _with_service(project_read())),
    Row(SERVICE, "ListNetworks", _list_networks, _with_service(expect()),
        check=_none_of_a("networks")),
    Row(SERVICE, "CreateNetwork", _create_network,
        _with_service(expect(a_reader=DENIED), DENIED)),
    Row(SERVICE, "CreateNetwork", _create_shared,
        expect(a_admin=DENIED, a_member=DENIED, a_reader=DENIED, b_admin=DENIED),
        case="shared"),
    Row(SERVICE, "UpdateNetwork", _update_network, project_write()),
    Row(SERVICE, "DeleteNetwork", _delete_network, project_write()),
    Row(SERVICE, "GetNetworkIpAvailability", _availability,
        expect(a_member=DENIED, a_reader=DENIED, b_admin=HIDDEN)),
    Row(SERVICE, "GetSubnet", _get_subnet, project_read()),
    Row(SERVICE, "ListSubnets", _list_subnets, expect(), check=_none_of_a("subnets")),
    Row(SERVICE, "CreateSubnet", _create_subnet, project_write()),
    Row(SERVICE, "UpdateSubnet", _update_subnet, project_write()),
    Row(SERVICE, "DeleteSubnet", _delete_subnet, project_write()),
    Row(SERVICE, "GetPort", _get_port, _with_service(project_read())),
    Row(SERVICE, "ListPorts", _list_ports, _with_service(expect()),
        check=_none_of_a("ports")),
    Row(SERVICE, "CreatePort", _create_port, _with_service(project_write())),
    Row(SERVICE, "UpdatePort", _update_port, _with_service(project_write())),
    Row(SERVICE, "DeletePort", _delete_port, _with_service(project_write())),
    Row(SERVICE, "WatchPorts", _watch_ports, expect()),
    Row(SERVICE, "BindPort", _bind_port, _with_service(_OPERATOR)),
    Row(SERVICE, "UnbindPort", _unbind_port, _with_service(_OPERATOR)),
)


# --- security groups, routers, floating IPs -------------------------------------

SG, RT, FIP = security_group_pb2, router_pb2, floating_ip_pb2
# Per world: project A's external network, made once.
_READY: dict[str, dict[str, str]] = {}


async def _ready(world: World) -> dict[str, str]:
    """The external network (with a subnet) the floating IP and gateway rows use."""
    made = _READY.get(world.store.root)
    if made is not None:
        return made
    external = await world.call(SERVICE, "CreateNetwork", N.CreateNetworkRequest(
        network=N.Network(meta=_meta(name=_name("ext")), external=True)), "cloud_admin")
    assert isinstance(external, N.Network)
    await world.call(SERVICE, "CreateSubnet", S.CreateSubnetRequest(subnet=S.Subnet(
        network_id=external.meta.id, cidr="198.19.0.0/16")), "cloud_admin")
    made = {"external_network": external.meta.id}
    _READY[world.store.root] = made
    return made


async def _group_in_a(world: World) -> str:
    await _ready(world)
    made = await world.call(SERVICE, "CreateSecurityGroup", SG.CreateSecurityGroupRequest(
        security_group=SG.SecurityGroup(meta=_meta(name=_name("sg"),
                                                   project_id=world.project_a))),
        "cloud_admin")
    assert isinstance(made, SG.SecurityGroup)
    return made.meta.id


def _rule(group_id: str) -> SG.SecurityGroupRule:
    return SG.SecurityGroupRule(security_group_id=group_id, protocol="tcp",
                                direction=SG.SecurityGroupRule.DIRECTION_INGRESS,
                                port_range_min=443, port_range_max=443)


async def _rule_in_a(world: World) -> str:
    made = await world.call(SERVICE, "CreateSecurityGroupRule", SG.CreateSecurityGroupRuleRequest(
        security_group_rule=_rule(await _group_in_a(world))), "cloud_admin")
    assert isinstance(made, SG.SecurityGroupRule)
    return made.meta.id


async def _router_in_a(world: World) -> str:
    """A router of project A as stored: without a node, as none could host it here."""
    await _ready(world)
    made = RT.Router(meta=resources.fresh_meta(_meta(name=_name("r")), world.project_a),
                     state=RT.Router.ERROR, admin_state_up=True)
    await world.store.create(f"network/routers/{made.meta.id}", made)
    return made.meta.id


async def _fip_in_a(world: World) -> str:
    ready = await _ready(world)
    made = await world.call(SERVICE, "CreateFloatingIp", FIP.CreateFloatingIpRequest(
        floating_ip=FIP.FloatingIp(meta=_meta(project_id=world.project_a),
                                   floating_network_id=ready["external_network"])),
        "cloud_admin")
    assert isinstance(made, FIP.FloatingIp)
    return made.meta.id


async def _routed_subnet_in_a(world: World) -> tuple[str, str, str]:
    """(router, subnet, network): a subnet of A behind a router with a gateway."""
    ready = await _ready(world)
    router_id, subnet = await _router_in_a(world), await _subnet_in_a(world)
    await world.call(SERVICE, "UpdateRouter", RT.UpdateRouterRequest(
        router=RT.Router(meta=_meta(id=router_id), external_gateway=RT.ExternalGateway(
            network_id=ready["external_network"])),
        update_mask=field_mask_pb2.FieldMask(paths=["external_gateway"])), "cloud_admin")
    await world.call(SERVICE, "AddRouterInterface", RT.AddRouterInterfaceRequest(
        router_id=router_id, subnet_id=subnet.meta.id), "cloud_admin")
    return router_id, subnet.meta.id, subnet.network_id


async def _get_group(world: World) -> message.Message:
    return SG.GetSecurityGroupRequest(id=await _group_in_a(world))


async def _list_groups(world: World) -> message.Message:
    await _group_in_a(world)
    return SG.ListSecurityGroupsRequest()


async def _create_group(world: World) -> message.Message:
    await _ready(world)
    return SG.CreateSecurityGroupRequest(security_group=SG.SecurityGroup(
        meta=_meta(name=_name("sg"))))


async def _update_group(world: World) -> message.Message:
    return SG.UpdateSecurityGroupRequest(
        security_group=SG.SecurityGroup(meta=_meta(id=await _group_in_a(world),
                                                   description="changed")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_group(world: World) -> message.Message:
    return SG.DeleteSecurityGroupRequest(id=await _group_in_a(world))


async def _get_rule(world: World) -> message.Message:
    return SG.GetSecurityGroupRuleRequest(id=await _rule_in_a(world))


async def _list_rules(world: World) -> message.Message:
    await _rule_in_a(world)
    return SG.ListSecurityGroupRulesRequest(filter="protocol=tcp")


async def _create_rule(world: World) -> message.Message:
    return SG.CreateSecurityGroupRuleRequest(security_group_rule=_rule(await _group_in_a(world)))


async def _delete_rule(world: World) -> message.Message:
    return SG.DeleteSecurityGroupRuleRequest(id=await _rule_in_a(world))


async def _get_router(world: World) -> message.Message:
    return RT.GetRouterRequest(id=await _router_in_a(world))


async def _list_routers(world: World) -> message.Message:
    await _router_in_a(world)
    return RT.ListRoutersRequest()


async def _create_router(world: World) -> message.Message:
    await _ready(world)
    return RT.CreateRouterRequest(router=RT.Router(meta=_meta(name=_name("r"))))


async def _update_router(world: World) -> message.Message:
    return RT.UpdateRouterRequest(
        router=RT.Router(meta=_meta(id=await _router_in_a(world), description="changed")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_router(world: World) -> message.Message:
    return RT.DeleteRouterRequest(id=await _router_in_a(world))


async def _add_interface(world: World) -> message.Message:
    router_id, subnet = await _router_in_a(world), await _subnet_in_a(world)
    return RT.AddRouterInterfaceRequest(router_id=router_id, subnet_id=subnet.meta.id)


async def _remove_interface(world: World) -> message.Message:
    router_id, subnet_id, _ = await _routed_subnet_in_a(world)
    return RT.RemoveRouterInterfaceRequest(router_id=router_id, subnet_id=subnet_id)


async def _get_fip(world: World) -> message.Message:
    return FIP.GetFloatingIpRequest(id=await _fip_in_a(world))


async def _list_fips(world: World) -> message.Message:
    await _fip_in_a(world)
    return FIP.ListFloatingIpsRequest()


async def _create_fip(world: World) -> message.Message:
    ready = await _ready(world)
    return FIP.CreateFloatingIpRequest(floating_ip=FIP.FloatingIp(
        floating_network_id=ready["external_network"]))


async def _update_fip(world: World) -> message.Message:
    return FIP.UpdateFloatingIpRequest(
        floating_ip=FIP.FloatingIp(meta=_meta(id=await _fip_in_a(world), description="changed")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_fip(world: World) -> message.Message:
    return FIP.DeleteFloatingIpRequest(id=await _fip_in_a(world))


async def _associate(world: World) -> message.Message:
    _, _, network_id = await _routed_subnet_in_a(world)
    port = await world.call(SERVICE, "CreatePort", P.CreatePortRequest(port=P.Port(
        meta=_meta(project_id=world.project_a), network_id=network_id)), "cloud_admin")
    assert isinstance(port, P.Port)
    return FIP.AssociateFloatingIpRequest(id=await _fip_in_a(world), port_id=port.meta.id)


async def _disassociate(world: World) -> message.Message:
    return FIP.DisassociateFloatingIpRequest(id=await _fip_in_a(world))


# Creating a router: policy lets the caller through, then no network node can host it.
_NO_NODE = grpc.StatusCode.FAILED_PRECONDITION

add_rows(
    Row(SERVICE, "GetSecurityGroup", _get_group, project_read()),
    Row(SERVICE, "ListSecurityGroups", _list_groups, _with_service(expect()),
        check=_none_of_a("security_groups")),
    Row(SERVICE, "CreateSecurityGroup", _create_group, expect(a_reader=DENIED)),
    Row(SERVICE, "UpdateSecurityGroup", _update_group, project_write()),
    Row(SERVICE, "DeleteSecurityGroup", _delete_group, project_write()),
    Row(SERVICE, "GetSecurityGroupRule", _get_rule, project_read()),
    Row(SERVICE, "ListSecurityGroupRules", _list_rules, expect(),
        check=_none_of_a("security_group_rules")),
    Row(SERVICE, "CreateSecurityGroupRule", _create_rule, project_write()),
    Row(SERVICE, "DeleteSecurityGroupRule", _delete_rule, project_write()),
    Row(SERVICE, "GetRouter", _get_router, project_read()),
    Row(SERVICE, "ListRouters", _list_routers, expect(), check=_none_of_a("routers")),
    Row(SERVICE, "CreateRouter", _create_router,
        expect(cloud_admin=_NO_NODE, a_admin=_NO_NODE, a_member=_NO_NODE, a_reader=DENIED,
               b_admin=_NO_NODE)),
    Row(SERVICE, "UpdateRouter", _update_router, project_write()),
    Row(SERVICE, "DeleteRouter", _delete_router, project_write()),
    Row(SERVICE, "AddRouterInterface", _add_interface, project_write()),
    Row(SERVICE, "RemoveRouterInterface", _remove_interface, project_write()),
    Row(SERVICE, "GetFloatingIp", _get_fip, project_read()),
    Row(SERVICE, "ListFloatingIps", _list_fips, expect(), check=_none_of_a("floating_ips")),
    Row(SERVICE, "CreateFloatingIp", _create_fip, expect(a_reader=DENIED)),
    Row(SERVICE, "UpdateFloatingIp", _update_fip, project_write()),
    Row(SERVICE, "DeleteFloatingIp", _delete_fip, project_write()),
    Row(SERVICE, "AssociateFloatingIp", _associate, project_write()),
    Row(SERVICE, "DisassociateFloatingIp", _disassociate, project_write()),
)
