"""`nubis project|user|role|quota|catalog ...`: identity administration from the command line."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client import cli_context
from services.client.channel import make_channel
from services.client.output import message_to_row

T = TypeVar("T")
if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    Stub = identity_pb2_grpc.IdentityServiceAsyncStub
P = identity_pb2

project_app = typer.Typer(help="Projects (tenants).", no_args_is_help=True)
user_app = typer.Typer(help="Users and their passwords.", no_args_is_help=True)
role_app = typer.Typer(help="Role assignments: reader, member, admin, cloud-admin.",
                       no_args_is_help=True)
quota_app = typer.Typer(help="Per-project quotas and usage.", no_args_is_help=True)
catalog_app = typer.Typer(help="The service catalog.", no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (cloud-admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'state=ENABLED'.")]
Revision = Annotated[int, typer.Option("--revision", help="Only if unchanged since (0: always).")]


def call(ctx: typer.Context, action: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one call against identity with the CLI's address and token."""
    cli = cli_context.get(ctx)

    async def run() -> T:
        channel = make_channel(cli.identity_address(), token=cli.token())
        try:
            return await action(identity_pb2_grpc.IdentityServiceStub(channel))
        finally:
            await channel.close()

    return asyncio.run(run())


def _flat(resource: Any) -> dict[str, Any]:
    """A Project/User as one flat row: the meta fields beside the resource's own."""
    row = message_to_row(resource)
    meta = row.pop("meta", {})
    return {**meta, **row}


def _show(ctx: typer.Context, resource: Any, title: str) -> None:
    cli_context.get(ctx).output.record(_flat(resource), title=title)


def _mask(**fields: object) -> list[str]:
    """Mask paths of the options given; name and description live in the metadata."""
    meta = {"name", "description"}
    return [f"meta.{name}" if name in meta else name
            for name, value in fields.items() if value is not None]


def _request_id() -> str:
    # One key per command run: if the reply is lost and the call retried, the
    # server returns what the first attempt made instead of making another.
    return str(uuid.uuid4())


async def _every_page(fetch: Callable[[str], Awaitable[tuple[list[T], str]]]) -> list[T]:
    """Follow next_page_token to the end."""
    items: list[T] = []
    token = ""
    while True:
        page, token = await fetch(token)
        items += page
        if not token:
            return items


@project_app.command("list")
def project_list(ctx: typer.Context, all_projects: AllProjects = False,
                 filter_: Filter = "") -> None:
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListProjects(P.ListProjectsRequest(
                all_projects=all_projects, filter=filter_, page_token=token))
            return list(reply.projects), reply.next_page_token
        return await _every_page(page)

    cli_context.get(ctx).output.table([_flat(p) for p in call(ctx, fetch)],
                                      ["id", "name", "state", "description"])


@project_app.command("show")
def project_show(ctx: typer.Context, project_id: str) -> None:
    _show(ctx, call(ctx, lambda s: s.GetProject(P.GetProjectRequest(id=project_id))), "project")


@project_app.command("create")
def project_create(ctx: typer.Context, name: str,
                   description: Annotated[str, typer.Option()] = "") -> None:
    meta = resource_pb2.ResourceMeta(name=name, description=description)
    request = P.CreateProjectRequest(project=P.Project(meta=meta), request_id=_request_id())
    _show(ctx, call(ctx, lambda s: s.CreateProject(request)), "project")


@project_app.command("update")
def project_update(
    ctx: typer.Context, project_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
) -> None:
    meta = resource_pb2.ResourceMeta(id=project_id, name=name or "",
                                     description=description or "")
    request = P.UpdateProjectRequest(
        project=P.Project(meta=meta, enabled=bool(enabled)),
        update_mask=field_mask_pb2.FieldMask(
            paths=_mask(name=name, description=description, enabled=enabled)),
    )
    _show(ctx, call(ctx, lambda s: s.UpdateProject(request)), "project")


@project_app.command("delete")
def project_delete(ctx: typer.Context, project_id: str, revision: Revision = 0) -> None:
    request = P.DeleteProjectRequest(id=project_id, revision=revision)
    call(ctx, lambda s: s.DeleteProject(request))
    cli_context.get(ctx).output.note(f"project {project_id} deleted")


@user_app.command("list")
def user_list(ctx: typer.Context, all_projects: AllProjects = False,
              filter_: Filter = "") -> None:
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListUsers(P.ListUsersRequest(
                all_projects=all_projects, filter=filter_, page_token=token))
            return list(reply.users), reply.next_page_token
        return await _every_page(page)

    cli_context.get(ctx).output.table([_flat(u) for u in call(ctx, fetch)],
                                      ["id", "name", "state", "default_project_id", "email"])


@user_app.command("show")
def user_show(ctx: typer.Context, user_id: str) -> None:
    _show(ctx, call(ctx, lambda s: s.GetUser(P.GetUserRequest(id=user_id))), "user")


@user_app.command("create")
def user_create(
    ctx: typer.Context, name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                          confirmation_prompt=True)],
    project: Annotated[str, typer.Option(help="Default project id.")] = "",
    email: Annotated[str, typer.Option()] = "",
) -> None:
    user = P.User(meta=resource_pb2.ResourceMeta(name=name), default_project_id=project,
                  email=email)
    request = P.CreateUserRequest(user=user, password=password, request_id=_request_id())
    reply = call(ctx, lambda s: s.CreateUser(request))
    _show(ctx, reply, "user")


@user_app.command("update")
def user_update(
    ctx: typer.Context, user_id: str,
    description: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
    default_project: Annotated[str | None, typer.Option()] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
    password: Annotated[bool, typer.Option("--password", help="Prompt for a new one.")] = False,
) -> None:
    secret = typer.prompt("New password", hide_input=True,
                          confirmation_prompt=True) if password else ""
    user = P.User(meta=resource_pb2.ResourceMeta(id=user_id, description=description or ""),
                  email=email or "", default_project_id=default_project or "",
                  enabled=bool(enabled))
    paths = _mask(description=description, email=email, default_project_id=default_project,
                  enabled=enabled, password=True if password else None)
    request = P.UpdateUserRequest(user=user, password=secret,
                                  update_mask=field_mask_pb2.FieldMask(paths=paths))
    _show(ctx, call(ctx, lambda s: s.UpdateUser(request)), "user")


@user_app.command("delete")
def user_delete(ctx: typer.Context, user_id: str, revision: Revision = 0) -> None:
    request = P.DeleteUserRequest(id=user_id, revision=revision)
    call(ctx, lambda s: s.DeleteUser(request))
    cli_context.get(ctx).output.note(f"user {user_id} deleted")


ProjectOption = Annotated[str, typer.Option("--project", help="Project id (default: token's).")]


@role_app.command("grant")
def role_grant(ctx: typer.Context, user_id: str, role: str, project: ProjectOption = "") -> None:
    request = P.GrantRoleRequest(user_id=user_id, project_id=project, role=role)
    reply = call(ctx, lambda s: s.GrantRole(request))
    cli_context.get(ctx).output.record(message_to_row(reply), title="role assignment")


@role_app.command("revoke")
def role_revoke(ctx: typer.Context, user_id: str, role: str, project: ProjectOption = "") -> None:
    request = P.RevokeRoleRequest(user_id=user_id, project_id=project, role=role)
    call(ctx, lambda s: s.RevokeRole(request))
    cli_context.get(ctx).output.note(f"role {role} revoked from {user_id}")


@role_app.command("list")
def role_list(ctx: typer.Context, project: ProjectOption = "",
              user: Annotated[str, typer.Option("--user")] = "",
              all_projects: AllProjects = False, filter_: Filter = "") -> None:
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListRoleAssignments(P.ListRoleAssignmentsRequest(
                project_id=project, user_id=user, all_projects=all_projects, filter=filter_,
                page_token=token))
            return list(reply.assignments), reply.next_page_token
        return await _every_page(page)

    cli_context.get(ctx).output.table([message_to_row(a) for a in call(ctx, fetch)],
                                      ["user_id", "project_id", "role", "create_time"])


def _limits_rows(values: dict[str, int], column: str) -> list[dict[str, Any]]:
    return [{"resource": name, column: values[name]} for name in sorted(values)]


@quota_app.command("show")
def quota_show(ctx: typer.Context, project: ProjectOption = "") -> None:
    reply = call(ctx, lambda s: s.GetQuota(P.GetQuotaRequest(project_id=project)))
    cli_context.get(ctx).output.table(_limits_rows(dict(reply.limits), "limit"),
                                      ["resource", "limit"], title=f"quota {reply.project_id}")


@quota_app.command("set")
def quota_set(
    ctx: typer.Context, project_id: str,
    limits: Annotated[list[str], typer.Argument(help="resource=limit, -1 for unlimited")],
) -> None:
    parsed: dict[str, int] = {}
    for item in limits:
        name, _, value = item.partition("=")
        try:
            parsed[name] = int(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not resource=integer") from None
    _update_quota(ctx, P.Quota(project_id=project_id, limits=parsed), list(parsed))


@quota_app.command("reset")
def quota_reset(
    ctx: typer.Context, project_id: str,
    resources: Annotated[list[str], typer.Argument(help="Resources back to the default.")],
) -> None:
    _update_quota(ctx, P.Quota(project_id=project_id), resources)


def _update_quota(ctx: typer.Context, quota: identity_pb2.Quota, resources: list[str]) -> None:
    """Change the named limits: to quota.limits' value, or to the default when absent."""
    mask = field_mask_pb2.FieldMask(paths=[f"limits.{name}" for name in resources])
    request = P.UpdateQuotaRequest(quota=quota, update_mask=mask)
    reply = call(ctx, lambda s: s.UpdateQuota(request))
    cli_context.get(ctx).output.table(_limits_rows(dict(reply.limits), "limit"),
                                      ["resource", "limit"], title=f"quota {reply.project_id}")


@quota_app.command("usage")
def quota_usage(ctx: typer.Context, project: ProjectOption = "") -> None:
    reply = call(ctx, lambda s: s.GetUsage(P.GetUsageRequest(project_id=project)))
    cli_context.get(ctx).output.table(_limits_rows(dict(reply.in_use), "in_use"),
                                      ["resource", "in_use"], title=f"usage {reply.project_id}")


@catalog_app.command("list")
def catalog_list(ctx: typer.Context,
                 name: Annotated[str, typer.Option(help="Only this service.")] = "") -> None:
    reply = call(ctx, lambda s: s.ListEndpoints(P.ListEndpointsRequest(name=name)))
    cli_context.get(ctx).output.table([message_to_row(e) for e in reply.endpoints],
                                      ["name", "address", "service", "instance_id"])
