"""`nubis network|subnet|port ...`: virtual networks, their address ranges, and ports."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import (
    network_pb2,
    port_pb2,
    security_group_pb2,
    subnet_pb2,
)

from services.client import cli_context
from services.client.commands import service_call
from services.client.peers import stubs

T = TypeVar("T")
Stub = stubs.NetworkClient
N, SN, PT = network_pb2, subnet_pb2, port_pb2

network_app = typer.Typer(help="Networks: layer-2 segments ports plug into.", no_args_is_help=True)
subnet_app = typer.Typer(help="Subnets: address ranges of a network, DHCP.", no_args_is_help=True)
port_app = typer.Typer(help="Ports: a NIC's place on a network (MAC, IPs, groups).",
                       no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'name=web'.")]
Description = Annotated[str, typer.Option("--description")]


def call(ctx: typer.Context, action: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one session of calls against nubis-network (the SDK's client)."""
    return service_call.run(ctx, "network", action)


def _kind(word: str, list_call: Callable[[Any], Awaitable[Any]], request: Any,
          field: str) -> service_call.Kind:
    async def lookup(filter_: str) -> list[Any]:
        return list(getattr(await list_call(request(filter=filter_, page_size=2)), field))
    return service_call.Kind(word, lookup)


def networks(s: Stub) -> service_call.Kind:
    return _kind("network", s.ListNetworks, N.ListNetworksRequest, "networks")


def subnets(s: Stub) -> service_call.Kind:
    return _kind("subnet", s.ListSubnets, SN.ListSubnetsRequest, "subnets")


def ports(s: Stub) -> service_call.Kind:
    return _kind("port", s.ListPorts, PT.ListPortsRequest, "ports")


def security_groups(s: Stub) -> service_call.Kind:
    return _kind("security group", s.ListSecurityGroups,
                 security_group_pb2.ListSecurityGroupsRequest, "security_groups")


async def listing(fetch: Callable[[Any], Awaitable[Any]], request: Callable[..., Any],
                  field: str, **fields: Any) -> list[Any]:
    """Every item of one List call, page after page."""
    async def page(token: str) -> tuple[list[Any], str]:
        reply = await fetch(request(page_token=token, page_size=service_call.PAGE_SIZE, **fields))
        return list(getattr(reply, field)), reply.next_page_token
    return await service_call.every_page(page)


def show(ctx: typer.Context, row: dict[str, Any], title: str) -> None:
    cli_context.get(ctx).output.record(row, title=title)


def table(ctx: typer.Context, rows: list[dict[str, Any]], columns: list[str]) -> None:
    cli_context.get(ctx).output.table(rows, columns)


def deleted(ctx: typer.Context, word: str, ref: str) -> None:
    cli_context.get(ctx).output.note(f"{word} {ref} deleted")


def pairs(items: list[str] | None, option: str) -> list[tuple[str, str]]:
    """`a=b` (or `a,b`) option values as pairs."""
    found: list[tuple[str, str]] = []
    for item in items or []:
        left, sep, right = item.partition("=") if "=" in item else item.partition(",")
        if not sep or not left or not right:
            raise typer.BadParameter(f"{item!r} is not two values joined by '=' ({option})")
        found.append((left, right))
    return found


# -- networks --------------------------------------------------------------------


class ProviderType(enum.StrEnum):
    ISOLATED = "isolated"
    NAT = "nat"
    BRIDGE = "bridge"


def _network_row(network: network_pb2.Network) -> dict[str, Any]:
    return service_call.flat(
        network, state=service_call.state_name(network), shared=network.shared,
        external=network.external, mtu=network.mtu, admin_state_up=network.admin_state_up,
        provider_type=N.Network.ProviderType.Name(network.provider_type)
        .removeprefix("PROVIDER_TYPE_").lower(), subnet_ids=list(network.subnet_ids))


@network_app.command("create")
def network_create(
    ctx: typer.Context, name: str,
    mtu: Annotated[int, typer.Option("--mtu", help="Link MTU (0: 1500).")] = 0,
    shared: Annotated[bool, typer.Option("--shared", help="Every project may use it "
                                         "(admin).")] = False,
    external: Annotated[bool, typer.Option("--external", help="Floating IPs and router "
                                           "gateways come from it (admin).")] = False,
    provider_type: Annotated[ProviderType | None, typer.Option("--provider-type")] = None,
    provider_bridge: Annotated[str, typer.Option("--provider-bridge",
                                                 help="Host bridge (bridge type, admin).")] = "",
    disable: Annotated[bool, typer.Option("--disable", help="Create it down.")] = False,
    description: Description = "",
) -> None:
    """Create a network."""
    kind = N.Network.ProviderType.Value(f"PROVIDER_TYPE_{provider_type.upper()}") \
        if provider_type else N.Network.PROVIDER_TYPE_UNSPECIFIED
    network = N.Network(meta=resource_pb2.ResourceMeta(name=name, description=description),
                        mtu=mtu, shared=shared, external=external, provider_type=kind,
                        provider_bridge=provider_bridge, admin_state_up=not disable)
    created = call(ctx, lambda s: s.CreateNetwork(N.CreateNetworkRequest(
        network=network, request_id=service_call.request_id())))
    show(ctx, _network_row(created), "network")


@network_app.command("list")
def network_list(ctx: typer.Context, all_projects: AllProjects = False,
                 filter_: Filter = "") -> None:
    """List the networks you can use: your project's, shared and external ones."""
    found = call(ctx, lambda s: listing(s.ListNetworks, N.ListNetworksRequest, "networks",
                                        all_projects=all_projects, filter=filter_))
    table(ctx, [_network_row(n) for n in found],
          ["id", "name", "state", "shared", "external", "subnet_ids"])


@network_app.command("show")
def network_show(ctx: typer.Context, network: str) -> None:
    """Show one network (id or name)."""
    async def run(s: Stub) -> network_pb2.Network:
        return await s.GetNetwork(N.GetNetworkRequest(id=await networks(s).id_of(network)))
    show(ctx, _network_row(call(ctx, run)), "network")


@network_app.command("delete")
def network_delete(
    ctx: typer.Context, network: str,
    force: Annotated[bool, typer.Option("--force", help="Delete its unbound ports too "
                                        "(admin).")] = False,
) -> None:
    """Delete a network and its subnets (refused while ports are on it)."""
    async def run(s: Stub) -> None:
        await s.DeleteNetwork(N.DeleteNetworkRequest(id=await networks(s).id_of(network),
                                                     force=force))
    call(ctx, run)
    deleted(ctx, "network", network)


# -- subnets ---------------------------------------------------------------------


def _subnet_row(subnet: subnet_pb2.Subnet) -> dict[str, Any]:
    return service_call.flat(
        subnet, state=service_call.state_name(subnet), ip_version=subnet.ip_version,
        dhcp_enabled=subnet.dhcp_enabled,
        allocation_pools=[f"{p.start}-{p.end}" for p in subnet.allocation_pools],
        dns_nameservers=list(subnet.dns_nameservers),
        host_routes=[f"{r.destination}={r.nexthop}" for r in subnet.host_routes])


@subnet_app.command("create")
def subnet_create(
    ctx: typer.Context, name: str,
    network: Annotated[str, typer.Option("--network", help="Network (id or name).")],
    cidr: Annotated[str, typer.Option("--cidr", help="e.g. 10.0.0.0/24 or fd00:1::/64.")],
    gateway: Annotated[str, typer.Option("--gateway", help="Gateway address "
                                         "(default: the first host).")] = "",
    no_gateway: Annotated[bool, typer.Option("--no-gateway", help="No gateway at all.")] = False,
    pool: Annotated[list[str] | None, typer.Option(
        "--pool", help="Allocation pool START=END or START,END (repeat).")] = None,
    dns: Annotated[list[str] | None, typer.Option("--dns", help="DNS server (repeat).")] = None,
    route: Annotated[list[str] | None, typer.Option(
        "--host-route", help="DESTINATION=NEXTHOP handed out by DHCP (repeat).")] = None,
    dhcp: Annotated[bool, typer.Option("--dhcp/--no-dhcp", help="Serve DHCP.")] = True,
    description: Description = "",
) -> None:
    """Create a subnet on a network."""
    async def run(s: Stub) -> subnet_pb2.Subnet:
        subnet = SN.Subnet(
            meta=resource_pb2.ResourceMeta(name=name, description=description),
            network_id=await networks(s).id_of(network), cidr=cidr, gateway_ip=gateway,
            disable_gateway=no_gateway, dhcp_enabled=dhcp, dns_nameservers=dns or [],
            allocation_pools=[SN.AllocationPool(start=a, end=b)
                              for a, b in pairs(pool, "--pool")],
            host_routes=[SN.HostRoute(destination=a, nexthop=b)
                         for a, b in pairs(route, "--host-route")])
        return await s.CreateSubnet(SN.CreateSubnetRequest(
            subnet=subnet, request_id=service_call.request_id()))
    show(ctx, _subnet_row(call(ctx, run)), "subnet")


@subnet_app.command("list")
def subnet_list(
    ctx: typer.Context,
    network: Annotated[str, typer.Option("--network", help="Only this network's.")] = "",
    all_projects: AllProjects = False, filter_: Filter = "",
) -> None:
    """List the subnets you can see."""
    async def run(s: Stub) -> list[Any]:
        terms = filter_
        if network:
            terms = f"{terms} network_id={await networks(s).id_of(network)}".strip()
        return await listing(s.ListSubnets, SN.ListSubnetsRequest, "subnets",
                             all_projects=all_projects, filter=terms)
    table(ctx, [_subnet_row(x) for x in call(ctx, run)],
          ["id", "name", "network_id", "cidr", "gateway_ip", "allocation_pools"])


@subnet_app.command("show")
def subnet_show(ctx: typer.Context, subnet: str) -> None:
    """Show one subnet (id or name)."""
    async def run(s: Stub) -> subnet_pb2.Subnet:
        return await s.GetSubnet(SN.GetSubnetRequest(id=await subnets(s).id_of(subnet)))
    show(ctx, _subnet_row(call(ctx, run)), "subnet")


@subnet_app.command("delete")
def subnet_delete(ctx: typer.Context, subnet: str) -> None:
    """Delete a subnet (refused while ports hold addresses in it)."""
    async def run(s: Stub) -> None:
        await s.DeleteSubnet(SN.DeleteSubnetRequest(id=await subnets(s).id_of(subnet)))
    call(ctx, run)
    deleted(ctx, "subnet", subnet)


# -- ports -----------------------------------------------------------------------


def _port_row(port: port_pb2.Port) -> dict[str, Any]:
    return service_call.flat(
        port, state=service_call.state_name(port),
        fixed_ips=[f"{ip.ip_address}" for ip in port.fixed_ips],
        security_group_ids=list(port.security_group_ids),
        port_security_enabled=port.port_security_enabled, admin_state_up=port.admin_state_up,
        allowed_address_pairs=[f"{p.ip_address}={p.mac_address}" if p.mac_address
                               else p.ip_address for p in port.allowed_address_pairs])


def _fixed_ip(text: str) -> tuple[str, str]:
    """`subnet=S,ip-address=A`, `S` (a subnet), or an address (has a dot or colon)."""
    if "=" not in text:
        return ("", text) if any(ch in text for ch in ".:") else (text, "")
    parsed = dict(pairs(text.split(","), "--fixed-ip"))
    unknown = set(parsed) - {"subnet", "ip-address"}
    if unknown:
        raise typer.BadParameter(f"--fixed-ip knows subnet= and ip-address=, not "
                                 f"{', '.join(sorted(unknown))}")
    return parsed.get("subnet", ""), parsed.get("ip-address", "")


@port_app.command("create")
def port_create(
    ctx: typer.Context, name: str,
    network: Annotated[str, typer.Option("--network", help="Network (id or name).")],
    fixed_ip: Annotated[list[str] | None, typer.Option(
        "--fixed-ip", help="subnet=S,ip-address=A, or just a subnet or an address (repeat; "
        "default: one address from each subnet).")] = None,
    mac: Annotated[str, typer.Option("--mac", help="MAC address (default: generated).")] = "",
    security_group: Annotated[list[str] | None, typer.Option(
        "--security-group", help="Group (id or name; repeat; default: the project's "
        "default group).")] = None,
    port_security: Annotated[bool, typer.Option(
        "--port-security/--no-port-security", help="Security groups and anti-spoofing.")] = True,
    allowed_pair: Annotated[list[str] | None, typer.Option(
        "--allowed-address", help="IP or CIDR anti-spoofing lets through, IP[=MAC] "
        "(repeat).")] = None,
    device_id: Annotated[str, typer.Option("--device-id")] = "",
    device_owner: Annotated[str, typer.Option("--device-owner")] = "",
    disable: Annotated[bool, typer.Option("--disable", help="Create it down.")] = False,
    description: Description = "",
) -> None:
    """Create a port; its MAC and addresses are allocated at once."""
    async def run(s: Stub) -> port_pb2.Port:
        ips = []
        for item in fixed_ip or []:
            subnet_ref, address = _fixed_ip(item)
            ips.append(PT.FixedIp(subnet_id=await subnets(s).id_of(subnet_ref),
                                  ip_address=address))
        address_pairs = [PT.AllowedAddressPair(ip_address=ip, mac_address=mac_of)
                         for ip, _, mac_of in (p.partition("=") for p in allowed_pair or [])]
        port = PT.Port(
            meta=resource_pb2.ResourceMeta(name=name, description=description),
            network_id=await networks(s).id_of(network), fixed_ips=ips, mac_address=mac,
            security_group_ids=await security_groups(s).ids_of(security_group or []),
            port_security_enabled=port_security, admin_state_up=not disable,
            allowed_address_pairs=address_pairs, device_id=device_id, device_owner=device_owner)
        return await s.CreatePort(PT.CreatePortRequest(port=port,
                                                       request_id=service_call.request_id()))
    show(ctx, _port_row(call(ctx, run)), "port")


@port_app.command("list")
def port_list(
    ctx: typer.Context,
    network: Annotated[str, typer.Option("--network", help="Only this network's.")] = "",
    all_projects: AllProjects = False, filter_: Filter = "",
) -> None:
    """List the ports you can see."""
    async def run(s: Stub) -> list[Any]:
        terms = filter_
        if network:
            terms = f"{terms} network_id={await networks(s).id_of(network)}".strip()
        return await listing(s.ListPorts, PT.ListPortsRequest, "ports",
                             all_projects=all_projects, filter=terms)
    table(ctx, [_port_row(p) for p in call(ctx, run)],
          ["id", "name", "state", "network_id", "mac_address", "fixed_ips", "device_owner"])


@port_app.command("show")
def port_show(ctx: typer.Context, port: str) -> None:
    """Show one port (id or name)."""
    async def run(s: Stub) -> port_pb2.Port:
        return await s.GetPort(PT.GetPortRequest(id=await ports(s).id_of(port)))
    show(ctx, _port_row(call(ctx, run)), "port")


@port_app.command("delete")
def port_delete(
    ctx: typer.Context, port: str,
    force: Annotated[bool, typer.Option("--force", help="Even if a device owns it "
                                        "(admin).")] = False,
) -> None:
    """Delete a port; its addresses and MAC are free again at once."""
    async def run(s: Stub) -> None:
        await s.DeletePort(PT.DeletePortRequest(id=await ports(s).id_of(port), force=force))
    call(ctx, run)
    deleted(ctx, "port", port)
