"""`nubis node list|show|disable|enable|set|defaults|set-defaults`: hypervisor nodes as the
scheduler sees them, and the cloud's default allocation ratios."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from google.protobuf import field_mask_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import cli_context
from services.client.commands.scheduler import call

if TYPE_CHECKING:
    from services.client.commands.scheduler import Stub
from services.client.output import message_to_row

app = typer.Typer(help="Nodes: capacity, usage, state; disable, enable and tune them.",
                  no_args_is_help=True)


NodeName = Annotated[str, typer.Argument(metavar="NODE", help="Node name.")]


def _usage(node: scheduler_pb2.Node, field: str) -> str:
    used = getattr(node.used, field)
    return f"{used}/{used + getattr(node.free, field)}"


def _row(node: scheduler_pb2.Node) -> dict[str, Any]:
    return {
        "name": node.name,
        "state": scheduler_pb2.NodeState.Name(node.state).removeprefix("NODE_STATE_"),
        "status": f"disabled ({node.disabled_reason})" if node.disabled and node.disabled_reason
        else ("disabled" if node.disabled else "enabled"),
        "vcpus": _usage(node, "vcpus"),
        "memory_mb": _usage(node, "memory_mb"),
        "disk_gb": _usage(node, "disk_gb"),
        "zone": node.availability_zone,
        "instances": node.allocation_count,
    }


@app.command("list")
def list_nodes(
    ctx: typer.Context,
    filter_text: Annotated[str, typer.Option(
        "--filter", help="e.g. 'state=UP availability_zone=az1 trait=CUSTOM_SSD'.")] = "",
) -> None:
    """List every node with used/allocatable resources."""

    async def every_page(stub: Stub) -> list[scheduler_pb2.Node]:
        found: list[scheduler_pb2.Node] = []
        token = ""
        while True:
            reply = await stub.ListNodes(
                scheduler_pb2.ListNodesRequest(page_size=1000, page_token=token,
                                               filter=filter_text))
            found.extend(reply.nodes)
            token = reply.next_page_token
            if not token:
                return found

    nodes = call(ctx, every_page)
    cli_context.get(ctx).output.table(
        [_row(node) for node in nodes],
        ["name", "state", "status", "vcpus", "memory_mb", "disk_gb", "zone", "instances"])


@app.command("show")
def show(ctx: typer.Context, name: NodeName) -> None:
    """Show one node in full."""
    node = call(ctx, lambda stub: stub.GetNode(scheduler_pb2.GetNodeRequest(name=name)))
    row = {**message_to_row(node), "state": _row(node)["state"]}  # UP, as `node list` says
    cli_context.get(ctx).output.record(row, title=f"node {name}")


def _update(ctx: typer.Context, name: str, settings: scheduler_pb2.NodeSettings,
            paths: list[str]) -> None:
    request = scheduler_pb2.UpdateNodeRequest(
        name=name, settings=settings, update_mask=field_mask_pb2.FieldMask(paths=paths))
    node = call(ctx, lambda stub: stub.UpdateNode(request))
    cli_context.get(ctx).output.record(_row(node), title=f"node {name}")


@app.command()
def disable(
    ctx: typer.Context, name: NodeName,
    reason: Annotated[str, typer.Option("--reason", help="Why (shown to operators).")] = "",
) -> None:
    """Stop scheduling onto a node (running instances stay)."""
    _update(ctx, name, scheduler_pb2.NodeSettings(disabled=True, disabled_reason=reason),
            ["disabled", "disabled_reason"])


@app.command()
def enable(ctx: typer.Context, name: NodeName) -> None:
    """Allow scheduling onto a node again."""
    _update(ctx, name, scheduler_pb2.NodeSettings(disabled=False), ["disabled"])


@app.command("set")
def set_node(
    ctx: typer.Context, name: NodeName,
    cpu_ratio: Annotated[float | None, typer.Option(help="vCPU allocation ratio.")] = None,
    ram_ratio: Annotated[float | None, typer.Option(help="Memory allocation ratio.")] = None,
    disk_ratio: Annotated[float | None, typer.Option(help="Disk allocation ratio.")] = None,
    reserved_vcpus: Annotated[int | None, typer.Option(help="vCPUs kept for the host.")] = None,
    reserved_memory_mb: Annotated[int | None, typer.Option(help="MiB kept for the host.")] = None,
    reserved_disk_gb: Annotated[int | None, typer.Option(help="GiB kept for the host.")] = None,
    trait: Annotated[list[str] | None, typer.Option(
        "--trait", help="Operator trait (repeat); replaces the operator traits.")] = None,
    zone: Annotated[str | None, typer.Option(help="Availability zone.")] = None,
) -> None:
    """Change allocation ratios, reserved amounts, traits or zone of a node."""
    settings = scheduler_pb2.NodeSettings()
    paths: list[str] = []
    for field, value in (("cpu", cpu_ratio), ("ram", ram_ratio), ("disk", disk_ratio)):
        if value is not None:
            setattr(settings.allocation_ratios, field, value)
            paths.append(f"allocation_ratios.{field}")
    reserved = (reserved_vcpus, reserved_memory_mb, reserved_disk_gb)
    if any(value is not None for value in reserved):
        current = call(ctx, lambda stub: stub.GetNode(scheduler_pb2.GetNodeRequest(name=name)))
        settings.reserved.CopyFrom(current.reserved)
        for field, value in zip(("vcpus", "memory_mb", "disk_gb"), reserved, strict=True):
            if value is not None:
                setattr(settings.reserved, field, value)
        paths.append("reserved")
    if trait is not None:
        settings.traits.extend(trait)
        paths.append("traits")
    if zone is not None:
        settings.availability_zone = zone
        paths.append("availability_zone")
    if not paths:
        raise typer.BadParameter("name at least one setting to change")
    _update(ctx, name, settings, paths)


def _ratios_row(record: scheduler_pb2.DefaultAllocationRatios) -> dict[str, Any]:
    return {"cpu_ratio": record.ratios.cpu, "ram_ratio": record.ratios.ram,
            "disk_ratio": record.ratios.disk, "revision": record.revision}


@app.command("defaults")
def show_defaults(ctx: typer.Context) -> None:
    """Show the cloud's default allocation ratios (for every ratio a node does not set)."""
    record = call(ctx, lambda stub: stub.GetDefaultAllocationRatios(
        scheduler_pb2.GetDefaultAllocationRatiosRequest()))
    cli_context.get(ctx).output.record(_ratios_row(record), title="default allocation ratios")


@app.command("set-defaults")
def set_defaults(
    ctx: typer.Context,
    cpu_ratio: Annotated[float | None, typer.Option(help="Default vCPU ratio.")] = None,
    ram_ratio: Annotated[float | None, typer.Option(help="Default memory ratio.")] = None,
    disk_ratio: Annotated[float | None, typer.Option(help="Default disk ratio.")] = None,
) -> None:
    """Change the cloud's default allocation ratios (every scheduler replica follows)."""
    record = scheduler_pb2.DefaultAllocationRatios()
    paths: list[str] = []
    for field, value in (("cpu", cpu_ratio), ("ram", ram_ratio), ("disk", disk_ratio)):
        if value is not None:
            setattr(record.ratios, field, value)
            paths.append(f"ratios.{field}")
    if not paths:
        raise typer.BadParameter("name at least one ratio to change")
    request = scheduler_pb2.UpdateDefaultAllocationRatiosRequest(
        default_allocation_ratios=record, update_mask=field_mask_pb2.FieldMask(paths=paths))
    updated = call(ctx, lambda stub: stub.UpdateDefaultAllocationRatios(request))
    cli_context.get(ctx).output.record(_ratios_row(updated), title="default allocation ratios")
