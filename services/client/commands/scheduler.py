"""`nubis server-group ...` and `nubis allocation show`, and the scheduler client of the CLI."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from nubis.common.v1 import resource_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import cli_context
from services.client.commands import service_call
from services.client.output import message_to_row
from services.client.peers import stubs

T = TypeVar("T")
Stub = stubs.SchedulerClient


def call(ctx: typer.Context, method: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one session of calls against the scheduler (the SDK's client: the catalog's
    replicas, or NUBIS_SCHEDULER_ADDR) with the invocation's credentials."""
    return service_call.run(ctx, "scheduler", method)


# -- server groups -------------------------------------------------------------

server_group_app = typer.Typer(help="Server groups: keep instances together or apart.",
                               no_args_is_help=True)


class PolicyName(enum.StrEnum):
    AFFINITY = "affinity"
    ANTI_AFFINITY = "anti-affinity"
    SOFT_AFFINITY = "soft-affinity"
    SOFT_ANTI_AFFINITY = "soft-anti-affinity"


_POLICY_VALUES = {
    PolicyName.AFFINITY: scheduler_pb2.AFFINITY,
    PolicyName.ANTI_AFFINITY: scheduler_pb2.ANTI_AFFINITY,
    PolicyName.SOFT_AFFINITY: scheduler_pb2.SOFT_AFFINITY,
    PolicyName.SOFT_ANTI_AFFINITY: scheduler_pb2.SOFT_ANTI_AFFINITY,
}


def _group_row(group: scheduler_pb2.ServerGroup) -> dict[str, Any]:
    return {
        "id": group.meta.id,
        "name": group.meta.name,
        "policy": scheduler_pb2.ServerGroupPolicy.Name(group.policy).lower().replace("_", "-"),
        "project_id": group.meta.project_id,
        "members": [f"{member}@{node}" for member, node in sorted(group.member_nodes.items())],
    }


@server_group_app.command("create")
def create_group(
    ctx: typer.Context,
    name: str,
    policy: Annotated[PolicyName, typer.Option("--policy", help="Placement policy.")],
    request_id: Annotated[str, typer.Option(
        "--request-id", help="Idempotency key: a retry with it returns the same group.")] = "",
) -> None:
    """Create a server group."""
    request = scheduler_pb2.CreateServerGroupRequest(server_group=scheduler_pb2.ServerGroup(
        meta=resource_pb2.ResourceMeta(name=name), policy=_POLICY_VALUES[policy]),
        request_id=request_id)
    group = call(ctx, lambda stub: stub.CreateServerGroup(request))
    cli_context.get(ctx).output.record(_group_row(group), title="server group")


@server_group_app.command("list")
def list_groups(
    ctx: typer.Context,
    all_projects: Annotated[bool, typer.Option("--all-projects",
                                               help="Every project (cloud-admin).")] = False,
    filter_text: Annotated[str, typer.Option(
        "--filter", help="e.g. 'name=web policy=ANTI_AFFINITY label.env=prod'.")] = "",
) -> None:
    """List server groups of the project."""
    request = scheduler_pb2.ListServerGroupsRequest(all_projects=all_projects, page_size=1000,
                                                    filter=filter_text)
    reply = call(ctx, lambda stub: stub.ListServerGroups(request))
    rows = [_group_row(group) for group in reply.server_groups]
    cli_context.get(ctx).output.table(rows, ["id", "name", "policy", "members"])


GroupRef = Annotated[str, typer.Argument(metavar="GROUP", help="Server group name or id.")]


async def _group_id(stub: Any, ref: str) -> str:
    """The id of the project's server group named or identified by `ref`."""
    async def lookup(filter_text: str) -> list[Any]:
        reply = await stub.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(
            page_size=1000, filter=filter_text))
        return list(reply.server_groups)

    return await service_call.Kind("server group", lookup).id_of(ref)


@server_group_app.command("show")
def show_group(ctx: typer.Context, group: GroupRef) -> None:
    """Show one server group and where its members run."""
    async def get(stub: Any) -> scheduler_pb2.ServerGroup:
        request = scheduler_pb2.GetServerGroupRequest(id=await _group_id(stub, group))
        reply: scheduler_pb2.ServerGroup = await stub.GetServerGroup(request)
        return reply

    found = call(ctx, get)
    cli_context.get(ctx).output.record(_group_row(found), title=f"server group {found.meta.name}")


@server_group_app.command("delete")
def delete_group(ctx: typer.Context, group: GroupRef) -> None:
    """Delete a server group (its members keep running)."""
    async def delete(stub: Any) -> None:
        request = scheduler_pb2.DeleteServerGroupRequest(id=await _group_id(stub, group))
        await stub.DeleteServerGroup(request)

    call(ctx, delete)
    cli_context.get(ctx).output.note(f"Deleted server group {group}.")


# -- allocations -----------------------------------------------------------------

allocation_app = typer.Typer(help="Placement allocations of consumers (instances).",
                             no_args_is_help=True)


@allocation_app.command("show")
def show_allocation(ctx: typer.Context, consumer_id: str) -> None:
    """Show where a consumer's resources are claimed."""
    held = call(ctx, lambda stub: stub.GetAllocations(
        scheduler_pb2.GetAllocationsRequest(consumer_id=consumer_id)))
    out = cli_context.get(ctx).output
    if out.json:
        out.emit_json(message_to_row(held))
        return
    rows = [{"node": a.node_name, "vcpus": a.resources.vcpus,
             "memory_mb": a.resources.memory_mb, "disk_gb": a.resources.disk_gb}
            for a in held.allocations]
    out.table(rows, ["node", "vcpus", "memory_mb", "disk_gb"],
              title=f"allocations of {consumer_id}")
