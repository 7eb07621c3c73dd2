"""`nubis flavor list|show|create|set|delete|access-add|access-remove`: the sizes servers
boot with, and which projects may use a private one; also the compute client of the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2

from services.client import cli_context
from services.client.commands import identity as identity_cli
from services.client.commands import network as network_cli
from services.client.commands import service_call
from services.client.peers import stubs
from services.common import errors

T = TypeVar("T")
Stub = stubs.ComputeClient
F = flavor_pb2

app = typer.Typer(help="Flavors: vCPUs, RAM and disks a server boots with (admin-managed).",
                  no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects",
                                           help="Private flavors of every project (admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'vcpus=2'.")]
Property = Annotated[list[str] | None, typer.Option(
    "--property", help="Extra spec KEY=VALUE, e.g. hw:cpu_policy=dedicated (repeat).")]


def call(ctx: typer.Context, action: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one session of calls against nubis-compute (the SDK's client)."""
    return service_call.run(ctx, "compute", action)


def flavors(stub: Stub) -> service_call.Kind:
    """Flavors by id or name (names are unique cloud-wide). A name the caller's own view
    lacks is looked up again in every project's, which only a cloud-admin may see (its
    private flavors without access)."""
    async def lookup(filter_: str) -> list[Any]:
        reply = await stub.ListFlavors(F.ListFlavorsRequest(filter=filter_, page_size=2))
        if reply.flavors:
            return list(reply.flavors)
        with contextlib.suppress(errors.PermissionDenied):
            reply = await stub.ListFlavors(F.ListFlavorsRequest(filter=filter_, page_size=2,
                                                                all_projects=True))
        return list(reply.flavors)
    return service_call.Kind("flavor", lookup)


def _row(flavor: flavor_pb2.Flavor) -> dict[str, Any]:
    return service_call.flat(
        flavor, state=service_call.state_name(flavor), vcpus=flavor.vcpus,
        ram_mb=flavor.ram_mb, disk_gb=flavor.disk_gb, ephemeral_gb=flavor.ephemeral_gb,
        swap_mb=flavor.swap_mb, is_public=flavor.is_public,
        access_project_ids=list(flavor.access_project_ids),
        extra_specs=dict(flavor.extra_specs), required_traits=list(flavor.required_traits),
        forbidden_traits=list(flavor.forbidden_traits))


def _show(ctx: typer.Context, flavor: flavor_pb2.Flavor) -> None:
    cli_context.get(ctx).output.record(_row(flavor), title="flavor")


@app.command("list")
def flavor_list(ctx: typer.Context, all_projects: AllProjects = False,
                filter_: Filter = "") -> None:
    """List the flavors you may boot with."""
    found = call(ctx, lambda s: network_cli.listing(
        s.ListFlavors, F.ListFlavorsRequest, "flavors", all_projects=all_projects,
        filter=filter_))
    cli_context.get(ctx).output.table(
        [_row(f) for f in found],
        ["id", "name", "state", "vcpus", "ram_mb", "disk_gb", "ephemeral_gb", "is_public"])


@app.command("show")
def flavor_show(ctx: typer.Context, flavor: str) -> None:
    """Show one flavor (id or name)."""
    async def run(s: Stub) -> flavor_pb2.Flavor:
        return await s.GetFlavor(F.GetFlavorRequest(id=await flavors(s).id_of(flavor)))
    _show(ctx, call(ctx, run))


@app.command("create")
def flavor_create(
    ctx: typer.Context, name: str,
    vcpus: Annotated[int, typer.Option("--vcpus", min=1, help="Virtual CPUs.")],
    ram: Annotated[int, typer.Option("--ram", min=64, help="Memory in MiB.")],
    disk: Annotated[int, typer.Option("--disk", min=0, help="Root disk in GiB "
                                      "(0: the image's size).")] = 0,
    ephemeral: Annotated[int, typer.Option("--ephemeral", min=0,
                                           help="Extra blank disk in GiB.")] = 0,
    swap: Annotated[int, typer.Option("--swap", min=0, help="Swap disk in MiB.")] = 0,
    private: Annotated[bool, typer.Option("--private", help="Only projects given access "
                                          "(access-add) may use it.")] = False,
    prop: Property = None,
    required_trait: Annotated[list[str] | None, typer.Option(
        "--required-trait", help="A trait every host must have (repeat).")] = None,
    forbidden_trait: Annotated[list[str] | None, typer.Option(
        "--forbidden-trait", help="A trait no host may have (repeat).")] = None,
    flavor_id: Annotated[str, typer.Option("--id", help="Its id (default: a new UUID).")] = "",
    description: Annotated[str, typer.Option("--description")] = "",
) -> None:
    """Create a flavor (admin)."""
    flavor = F.Flavor(
        meta=resource_pb2.ResourceMeta(id=flavor_id, name=name, description=description),
        vcpus=vcpus, ram_mb=ram, disk_gb=disk, ephemeral_gb=ephemeral, swap_mb=swap,
        is_public=not private, extra_specs=dict(network_cli.pairs(prop, "--property")),
        required_traits=required_trait or [], forbidden_traits=forbidden_trait or [])
    created = call(ctx, lambda s: s.CreateFlavor(F.CreateFlavorRequest(
        flavor=flavor, request_id=service_call.request_id())))
    _show(ctx, created)


@app.command("set")
def flavor_set(
    ctx: typer.Context, flavor: str,
    name: Annotated[str | None, typer.Option("--name", help="New name.")] = None,
    description: Annotated[str | None, typer.Option("--description")] = None,
    enabled: Annotated[bool | None, typer.Option(
        "--enable/--disable", help="Disabled flavors keep their servers; no new boots.")] = None,
    prop: Property = None,
    unset: Annotated[list[str] | None, typer.Option(
        "--unset-property", help="Remove this extra spec (repeat).")] = None,
) -> None:
    """Change a flavor's name, description, state or extra specs (admin)."""
    added = dict(network_cli.pairs(prop, "--property"))

    async def run(s: Stub) -> flavor_pb2.Flavor:
        current = await s.GetFlavor(F.GetFlavorRequest(id=await flavors(s).id_of(flavor)))
        wanted = F.Flavor(meta=resource_pb2.ResourceMeta(id=current.meta.id,
                                                         revision=current.meta.revision))
        paths = _changes(wanted, current, name, description, enabled)
        if added or unset:
            specs = {**dict(current.extra_specs), **added}
            for key in unset or []:
                specs.pop(key, None)
            wanted.extra_specs.update(specs)
            paths.append("extra_specs")
        if not paths:
            raise typer.BadParameter("nothing to change: give --name, --description, "
                                     "--enable/--disable, --property or --unset-property")
        return await s.UpdateFlavor(F.UpdateFlavorRequest(
            flavor=wanted, update_mask=field_mask_pb2.FieldMask(paths=paths)))

    _show(ctx, call(ctx, run))


def _changes(wanted: flavor_pb2.Flavor, current: flavor_pb2.Flavor, name: str | None,
             description: str | None, enabled: bool | None) -> list[str]:
    """Fill `wanted` with the options given; the mask paths they make."""
    paths = []
    if name is not None:
        wanted.meta.name = name
        paths.append("meta.name")
    if description is not None:
        wanted.meta.description = description
        paths.append("meta.description")
    if enabled is not None:
        wanted.state = F.Flavor.ACTIVE if enabled else F.Flavor.DISABLED
        paths.append("state")
    return paths


@app.command("delete")
def flavor_delete(ctx: typer.Context, flavor: str) -> None:
    """Delete a flavor (admin); servers booted with it keep their copy."""
    async def run(s: Stub) -> None:
        await s.DeleteFlavor(F.DeleteFlavorRequest(id=await flavors(s).id_of(flavor)))
    call(ctx, run)
    cli_context.get(ctx).output.note(f"flavor {flavor} deleted")


def _access(ctx: typer.Context, flavor: str, project: str, add: bool) -> None:
    project_id = identity_cli.call(ctx, lambda s: identity_cli.project_id(s, project))

    async def run(s: Stub) -> flavor_pb2.Flavor:
        request = F.FlavorAccessRequest(flavor_id=await flavors(s).id_of(flavor),
                                        project_id=project_id)
        return await (s.AddFlavorAccess(request) if add else s.RemoveFlavorAccess(request))

    _show(ctx, call(ctx, run))


@app.command("access-add")
def flavor_access_add(ctx: typer.Context, flavor: str, project: str) -> None:
    """Let a project (id or name) use a private flavor (admin)."""
    _access(ctx, flavor, project, add=True)


@app.command("access-remove")
def flavor_access_remove(ctx: typer.Context, flavor: str, project: str) -> None:
    """Take a project's access to a private flavor away (admin)."""
    _access(ctx, flavor, project, add=False)
