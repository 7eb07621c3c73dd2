"""`nubis router|floating-ip ...`: routers between subnets and out through an external
network, and floating IPs mapped onto ports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import floating_ip_pb2, router_pb2

from services.client.commands import service_call
from services.client.commands.network import (
    AllProjects,
    Description,
    Filter,
    call,
    deleted,
    listing,
    networks,
    ports,
    show,
    subnets,
    table,
)

if TYPE_CHECKING:
    from services.client.commands.network import Stub
R, F = router_pb2, floating_ip_pb2

router_app = typer.Typer(help="Routers: join subnets, reach an external network with SNAT.",
                         no_args_is_help=True)
floating_ip_app = typer.Typer(help="Floating IPs: external addresses mapped onto ports.",
                              no_args_is_help=True)


def routers(s: Stub) -> service_call.Kind:
    async def lookup(filter_: str) -> list[Any]:
        return list((await s.ListRouters(R.ListRoutersRequest(filter=filter_,
                                                              page_size=2))).routers)
    return service_call.Kind("router", lookup)


def floating_ips(s: Stub) -> service_call.Kind:
    """Floating IPs by id or by address."""
    async def lookup(filter_: str) -> list[Any]:
        return list((await s.ListFloatingIps(F.ListFloatingIpsRequest(
            filter=filter_, page_size=2))).floating_ips)
    return service_call.Kind("floating IP", lookup, key="floating_ip_address")


def _router_row(router: router_pb2.Router) -> dict[str, Any]:
    gateway = router.external_gateway if router.HasField("external_gateway") else None
    return service_call.flat(
        router, state=service_call.state_name(router), admin_state_up=router.admin_state_up,
        external_network_id=gateway.network_id if gateway else "",
        external_ips=[ip.ip_address for ip in gateway.external_fixed_ips] if gateway else [],
        snat=(not gateway.HasField("enable_snat") or gateway.enable_snat) if gateway else "",
        interfaces=[f"{i.subnet_id}={i.ip_address}" for i in router.interfaces])


def _gateway(network_id: str, snat: bool) -> router_pb2.ExternalGateway:
    return R.ExternalGateway(network_id=network_id, enable_snat=snat)


@router_app.command("create")
def router_create(
    ctx: typer.Context, name: str,
    external_gateway: Annotated[str, typer.Option(
        "--external-gateway", help="External network (id or name) for the uplink.")] = "",
    snat: Annotated[bool, typer.Option("--snat/--no-snat", help="Source-NAT the router's "
                                       "subnets out of the gateway.")] = True,
    disable: Annotated[bool, typer.Option("--disable", help="Create it down.")] = False,
    description: Description = "",
) -> None:
    """Create a router, optionally with its external gateway."""
    async def run(s: Stub) -> router_pb2.Router:
        router = R.Router(meta=resource_pb2.ResourceMeta(name=name, description=description),
                          admin_state_up=not disable)
        if external_gateway:
            router.external_gateway.CopyFrom(
                _gateway(await networks(s).id_of(external_gateway), snat))
        return await s.CreateRouter(R.CreateRouterRequest(router=router,
                                                          request_id=service_call.request_id()))
    show(ctx, _router_row(call(ctx, run)), "router")


@router_app.command("list")
def router_list(ctx: typer.Context, all_projects: AllProjects = False,
                filter_: Filter = "") -> None:
    """List your project's routers."""
    found = call(ctx, lambda s: listing(s.ListRouters, R.ListRoutersRequest, "routers",
                                        all_projects=all_projects, filter=filter_))
    table(ctx, [_router_row(r) for r in found],
          ["id", "name", "state", "external_network_id", "external_ips", "interfaces"])


@router_app.command("show")
def router_show(ctx: typer.Context, router: str) -> None:
    """Show one router (id or name)."""
    async def run(s: Stub) -> router_pb2.Router:
        return await s.GetRouter(R.GetRouterRequest(id=await routers(s).id_of(router)))
    show(ctx, _router_row(call(ctx, run)), "router")


@router_app.command("delete")
def router_delete(ctx: typer.Context, router: str) -> None:
    """Delete a router (refused while it has interfaces or floating IPs)."""
    async def run(s: Stub) -> None:
        await s.DeleteRouter(R.DeleteRouterRequest(id=await routers(s).id_of(router)))
    call(ctx, run)
    deleted(ctx, "router", router)


@router_app.command("add-subnet")
def router_add_subnet(ctx: typer.Context, router: str, subnet: str) -> None:
    """Attach a subnet: the router takes the subnet's gateway address."""
    async def run(s: Stub) -> router_pb2.Router:
        return await s.AddRouterInterface(R.AddRouterInterfaceRequest(
            router_id=await routers(s).id_of(router), subnet_id=await subnets(s).id_of(subnet)))
    show(ctx, _router_row(call(ctx, run)), "router")


@router_app.command("remove-subnet")
def router_remove_subnet(ctx: typer.Context, router: str, subnet: str) -> None:
    """Detach a subnet; the router's port on it is deleted."""
    async def run(s: Stub) -> router_pb2.Router:
        return await s.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(
            router_id=await routers(s).id_of(router), subnet_id=await subnets(s).id_of(subnet)))
    show(ctx, _router_row(call(ctx, run)), "router")


@router_app.command("set-gateway")
def router_set_gateway(
    ctx: typer.Context, router: str,
    network: Annotated[str, typer.Argument(help="External network (id or name).")] = "",
    snat: Annotated[bool, typer.Option("--snat/--no-snat")] = True,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the gateway.")] = False,
) -> None:
    """Set (or with --clear remove) a router's external gateway."""
    if bool(network) == clear:
        raise typer.BadParameter("give an external network, or --clear")

    async def run(s: Stub) -> router_pb2.Router:
        changed = R.Router(meta=resource_pb2.ResourceMeta(id=await routers(s).id_of(router)))
        if network:
            changed.external_gateway.CopyFrom(_gateway(await networks(s).id_of(network), snat))
        return await s.UpdateRouter(R.UpdateRouterRequest(
            router=changed, update_mask=field_mask_pb2.FieldMask(paths=["external_gateway"])))
    show(ctx, _router_row(call(ctx, run)), "router")


# -- floating IPs ----------------------------------------------------------------


def _floating_row(floating: floating_ip_pb2.FloatingIp) -> dict[str, Any]:
    return service_call.flat(floating, state=service_call.state_name(floating))


@floating_ip_app.command("create")
def floating_ip_create(
    ctx: typer.Context,
    network: Annotated[str, typer.Argument(help="External network (id or name).")],
    port: Annotated[str, typer.Option("--port", help="Associate with this port at once.")] = "",
    address: Annotated[str, typer.Option("--address", help="A specific address "
                                         "(admin).")] = "",
    description: Description = "",
) -> None:
    """Allocate a floating IP from an external network."""
    async def run(s: Stub) -> floating_ip_pb2.FloatingIp:
        floating = F.FloatingIp(meta=resource_pb2.ResourceMeta(description=description),
                                floating_network_id=await networks(s).id_of(network),
                                floating_ip_address=address)
        return await s.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=floating, port_id=await ports(s).id_of(port),
            request_id=service_call.request_id()))
    show(ctx, _floating_row(call(ctx, run)), "floating IP")


@floating_ip_app.command("list")
def floating_ip_list(ctx: typer.Context, all_projects: AllProjects = False,
                     filter_: Filter = "") -> None:
    """List your project's floating IPs."""
    found = call(ctx, lambda s: listing(s.ListFloatingIps, F.ListFloatingIpsRequest,
                                        "floating_ips", all_projects=all_projects,
                                        filter=filter_))
    table(ctx, [_floating_row(f) for f in found],
          ["id", "floating_ip_address", "state", "port_id", "fixed_ip_address", "router_id"])


@floating_ip_app.command("show")
def floating_ip_show(ctx: typer.Context, floating_ip: str) -> None:
    """Show one floating IP (id or address)."""
    async def run(s: Stub) -> floating_ip_pb2.FloatingIp:
        return await s.GetFloatingIp(F.GetFloatingIpRequest(
            id=await floating_ips(s).id_of(floating_ip)))
    show(ctx, _floating_row(call(ctx, run)), "floating IP")


@floating_ip_app.command("delete")
def floating_ip_delete(ctx: typer.Context, floating_ip: str) -> None:
    """Release a floating IP (disassociated first)."""
    async def run(s: Stub) -> None:
        await s.DeleteFloatingIp(F.DeleteFloatingIpRequest(
            id=await floating_ips(s).id_of(floating_ip)))
    call(ctx, run)
    deleted(ctx, "floating IP", floating_ip)


@floating_ip_app.command("associate")
def floating_ip_associate(
    ctx: typer.Context, floating_ip: str, port: str,
    fixed_ip: Annotated[str, typer.Option("--fixed-ip", help="Which of the port's addresses "
                                          "(default: its first IPv4).")] = "",
) -> None:
    """Map a floating IP onto a port (its subnet needs a router with a gateway)."""
    async def run(s: Stub) -> floating_ip_pb2.FloatingIp:
        return await s.AssociateFloatingIp(F.AssociateFloatingIpRequest(
            id=await floating_ips(s).id_of(floating_ip), port_id=await ports(s).id_of(port),
            fixed_ip_address=fixed_ip))
    show(ctx, _floating_row(call(ctx, run)), "floating IP")


@floating_ip_app.command("disassociate")
def floating_ip_disassociate(ctx: typer.Context, floating_ip: str) -> None:
    """Remove a floating IP's mapping; the address stays allocated."""
    async def run(s: Stub) -> floating_ip_pb2.FloatingIp:
        return await s.DisassociateFloatingIp(F.DisassociateFloatingIpRequest(
            id=await floating_ips(s).id_of(floating_ip)))
    show(ctx, _floating_row(call(ctx, run)), "floating IP")
