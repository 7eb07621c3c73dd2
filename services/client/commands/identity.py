"""`nubis project|user|role|quota|catalog ...`: identity administration from the command line."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.client import cli_context
from services.client.commands import service_call
from services.client.output import message_to_row
from services.client.peers import stubs
from services.common import errors

T = TypeVar("T")
Stub = stubs.IdentityClient
P = identity_pb2

project_app = typer.Typer(help="Projects (tenants).", no_args_is_help=True)
user_app = typer.Typer(help="Users and their passwords.", no_args_is_help=True)
role_app = typer.Typer(help="Role assignments: reader, member, admin, cloud-admin.",
                       no_args_is_help=True)
quota_app = typer.Typer(help="Per-project quotas, the cloud's defaults, and usage.",
                        no_args_is_help=True)
catalog_app = typer.Typer(help="The service catalog.", no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (cloud-admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'state=ENABLED'.")]
Revision = Annotated[int, typer.Option("--revision", help="Only if unchanged since (0: always).")]


def call(ctx: typer.Context, action: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one session of calls against identity (the SDK's client) with the CLI's token."""
    return service_call.run(ctx, "identity", action)


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


async def _resolve(kind: str, ref: str,
                   lookup: Callable[[str, bool], Awaitable[list[Any]]]) -> str:
    """The id of a project or user given by id or by unique name ("" stays "": the default).

    A cloud-admin sees every project's names; anyone else sees their own
    project's, so the lookup widens only when the caller may.
    """
    if not ref or service_call.is_uuid(ref):
        return ref
    if any(ch.isspace() or ch in ",=" for ch in ref):
        raise errors.InvalidArgument(f"{kind} {ref!r} is neither an id nor a plain name",
                                     reason="nubis.cli.bad_reference")
    try:
        found = await lookup(f"name={ref}", True)
    except errors.PermissionDenied:
        found = await lookup(f"name={ref}", False)
    if len(found) != 1:
        if not found:
            raise errors.NotFound(f"no {kind} named {ref!r}", reason="nubis.cli.no_such_name")
        raise errors.FailedPrecondition(f"more than one {kind} named {ref!r}; give its id",
                                        reason="nubis.cli.ambiguous_name")
    return str(found[0].meta.id)


async def project_id(s: Stub, ref: str) -> str:
    """A project id from an id or a name."""
    async def lookup(filter_: str, every: bool) -> list[Any]:
        reply = await s.ListProjects(P.ListProjectsRequest(filter=filter_, all_projects=every))
        return list(reply.projects)
    return await _resolve("project", ref, lookup)


async def user_id(s: Stub, ref: str) -> str:
    """A user id from an id or a name."""
    async def lookup(filter_: str, every: bool) -> list[Any]:
        reply = await s.ListUsers(P.ListUsersRequest(filter=filter_, all_projects=every))
        return list(reply.users)
    return await _resolve("user", ref, lookup)


@project_app.command("list")
def project_list(ctx: typer.Context, all_projects: AllProjects = False,
                 filter_: Filter = "") -> None:
    """List projects (every one with --all-projects)."""
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListProjects(P.ListProjectsRequest(
                all_projects=all_projects, filter=filter_, page_token=token))
            return list(reply.projects), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table([_flat(p) for p in call(ctx, fetch)],
                                      ["id", "name", "state", "description"])


@project_app.command("show")
def project_show(ctx: typer.Context, project: str) -> None:
    """Show one project."""
    async def run(s: Stub) -> Any:
        return await s.GetProject(P.GetProjectRequest(id=await project_id(s, project)))
    _show(ctx, call(ctx, run), "project")


@project_app.command("create")
def project_create(ctx: typer.Context, name: str,
                   description: Annotated[str, typer.Option()] = "") -> None:
    """Create a project."""
    meta = resource_pb2.ResourceMeta(name=name, description=description)
    request = P.CreateProjectRequest(project=P.Project(meta=meta),
                                     request_id=service_call.request_id())
    _show(ctx, call(ctx, lambda s: s.CreateProject(request)), "project")


@project_app.command("update")
def project_update(
    ctx: typer.Context, project: str,
    name: Annotated[str | None, typer.Option()] = None,
    description: Annotated[str | None, typer.Option()] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
) -> None:
    """Change a project's name, description or enabled state."""
    async def run(s: Stub) -> Any:
        meta = resource_pb2.ResourceMeta(id=await project_id(s, project), name=name or "",
                                         description=description or "")
        return await s.UpdateProject(P.UpdateProjectRequest(
            project=P.Project(meta=meta, enabled=bool(enabled)),
            update_mask=field_mask_pb2.FieldMask(
                paths=_mask(name=name, description=description, enabled=enabled)),
        ))
    _show(ctx, call(ctx, run), "project")


@project_app.command("delete")
def project_delete(ctx: typer.Context, project: str, revision: Revision = 0) -> None:
    """Delete a project."""
    async def run(s: Stub) -> Any:
        request = P.DeleteProjectRequest(id=await project_id(s, project), revision=revision)
        return await s.DeleteProject(request)
    call(ctx, run)
    cli_context.get(ctx).output.note(f"project {project} deleted")


@user_app.command("list")
def user_list(ctx: typer.Context, all_projects: AllProjects = False,
              filter_: Filter = "") -> None:
    """List users."""
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListUsers(P.ListUsersRequest(
                all_projects=all_projects, filter=filter_, page_token=token))
            return list(reply.users), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table([_flat(u) for u in call(ctx, fetch)],
                                      ["id", "name", "state", "default_project_id", "email"])


@user_app.command("show")
def user_show(ctx: typer.Context, user: str) -> None:
    """Show one user."""
    async def run(s: Stub) -> Any:
        return await s.GetUser(P.GetUserRequest(id=await user_id(s, user)))
    _show(ctx, call(ctx, run), "user")


@user_app.command("create")
def user_create(
    ctx: typer.Context, name: str,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True,
                                          confirmation_prompt=True,
                                          help="Password (asked for when not given).")],
    project: Annotated[str, typer.Option(help="Default project (id or name).")] = "",
    email: Annotated[str, typer.Option()] = "",
) -> None:
    """Create a user with a password."""
    async def run(s: Stub) -> Any:
        user = P.User(meta=resource_pb2.ResourceMeta(name=name),
                      default_project_id=await project_id(s, project), email=email)
        return await s.CreateUser(P.CreateUserRequest(user=user, password=password,
                                                      request_id=service_call.request_id()))
    _show(ctx, call(ctx, run), "user")


@user_app.command("update")
def user_update(
    ctx: typer.Context, user: str,
    description: Annotated[str | None, typer.Option()] = None,
    email: Annotated[str | None, typer.Option()] = None,
    default_project: Annotated[str | None, typer.Option()] = None,
    enabled: Annotated[bool | None, typer.Option("--enable/--disable")] = None,
    password: Annotated[bool, typer.Option("--password", help="Prompt for a new one.")] = False,
) -> None:
    """Change a user's description, email, default project or enabled state."""
    secret = typer.prompt("New password", hide_input=True,
                          confirmation_prompt=True) if password else ""
    paths = _mask(description=description, email=email, default_project_id=default_project,
                  enabled=enabled, password=True if password else None)
    caller = _token_subject(cli_context.get(ctx).token())

    async def run(s: Stub) -> Any:
        meta = resource_pb2.ResourceMeta(id=await user_id(s, user),
                                         description=description or "")
        changed = P.User(meta=meta, email=email or "", enabled=bool(enabled),
                         default_project_id=await project_id(s, default_project or ""))
        # The service wants proof of the current password when users change their own.
        original = typer.prompt("Current password", hide_input=True) \
            if password and meta.id == caller else ""
        return await s.UpdateUser(P.UpdateUserRequest(
            user=changed, password=secret, original_password=original,
            update_mask=field_mask_pb2.FieldMask(paths=paths)))
    _show(ctx, call(ctx, run), "user")


def _token_subject(token: str | None) -> str:
    """The user id a JWT names (unverified: it only decides whether to prompt)."""
    try:
        payload = (token or "").split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return ""
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) else ""


@user_app.command("delete")
def user_delete(ctx: typer.Context, user: str, revision: Revision = 0) -> None:
    """Delete a user."""
    async def run(s: Stub) -> Any:
        request = P.DeleteUserRequest(id=await user_id(s, user), revision=revision)
        return await s.DeleteUser(request)
    call(ctx, run)
    cli_context.get(ctx).output.note(f"user {user} deleted")


ProjectOption = Annotated[
    str, typer.Option("--project", help="Project id or name (default: the token's).")]


@role_app.command("grant")
def role_grant(ctx: typer.Context, user: str, role: str, project: ProjectOption = "") -> None:
    """Give a user a role on a project."""
    async def run(s: Stub) -> Any:
        return await s.GrantRole(P.GrantRoleRequest(
            user_id=await user_id(s, user), project_id=await project_id(s, project), role=role))
    cli_context.get(ctx).output.record(message_to_row(call(ctx, run)), title="role assignment")


@role_app.command("revoke")
def role_revoke(ctx: typer.Context, user: str, role: str, project: ProjectOption = "") -> None:
    """Take a role on a project away from a user."""
    async def run(s: Stub) -> Any:
        return await s.RevokeRole(P.RevokeRoleRequest(
            user_id=await user_id(s, user), project_id=await project_id(s, project), role=role))
    call(ctx, run)
    cli_context.get(ctx).output.note(f"role {role} revoked from {user}")


@role_app.command("list")
def role_list(ctx: typer.Context, project: ProjectOption = "",
              user: Annotated[str, typer.Option("--user")] = "",
              all_projects: AllProjects = False, filter_: Filter = "") -> None:
    """List role assignments, by project and user."""
    async def fetch(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListRoleAssignments(P.ListRoleAssignmentsRequest(
                project_id=project_ref, user_id=user_ref, all_projects=all_projects,
                filter=filter_, page_token=token))
            return list(reply.assignments), reply.next_page_token
        project_ref, user_ref = await project_id(s, project), await user_id(s, user)
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table([message_to_row(a) for a in call(ctx, fetch)],
                                      ["user_id", "project_id", "role", "create_time"])


def _limits_rows(values: dict[str, int], column: str) -> list[dict[str, Any]]:
    return [{"resource": name, column: values[name]} for name in sorted(values)]


ProjectArgument = Annotated[str, typer.Argument(
    metavar="[PROJECT]", help="Project id or name, as --project (default: the token's).")]


@quota_app.command("show")
def quota_show(ctx: typer.Context, positional: ProjectArgument = "",
               project: ProjectOption = "") -> None:
    """Show a project's limits (the defaults where it has none of its own)."""
    project = project or positional
    async def run(s: Stub) -> Any:
        return await s.GetQuota(P.GetQuotaRequest(project_id=await project_id(s, project)))
    reply = call(ctx, run)
    cli_context.get(ctx).output.table(
        _limits_rows(dict(reply.limits), "limit"), ["resource", "limit"],
        title=f"quota of project {project or reply.project_id}")


def _parse_limits(limits: list[str]) -> dict[str, int]:
    parsed: dict[str, int] = {}
    for item in limits:
        name, _, value = item.partition("=")
        try:
            parsed[name] = int(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r} is not resource=integer") from None
    return parsed


@quota_app.command("set")
def quota_set(
    ctx: typer.Context,
    limits: Annotated[list[str], typer.Argument(
        metavar="[PROJECT] RESOURCE=LIMIT...",
        help="resource=limit, -1 for unlimited; the project first when --project is not given.")],
    project: ProjectOption = "",
) -> None:
    """Set limits of a project: `quota set --project P cores=8 ram_mb=-1` (or `quota set P ...`)."""
    project, rest = _project_and_rest(project, limits, lambda arg: "=" not in arg)
    parsed = _parse_limits(rest)
    _update_quota(ctx, project, parsed, list(parsed))


def _project_and_rest(project: str, args: list[str],
                      is_project: Callable[[str], bool]) -> tuple[str, list[str]]:
    """--project, else a leading positional project (the older form); the other arguments."""
    if not project and args and is_project(args[0]):
        return args[0], args[1:]
    return project, args


@quota_app.command("defaults")
def quota_defaults(ctx: typer.Context) -> None:
    """The cloud's default limits: what every project without an override gets."""
    reply = call(ctx, lambda s: s.GetDefaultQuota(P.GetDefaultQuotaRequest()))
    cli_context.get(ctx).output.table(_limits_rows(dict(reply.limits), "limit"),
                                      ["resource", "limit"], title="default quota")


@quota_app.command("set-default")
def quota_set_default(
    ctx: typer.Context,
    limits: Annotated[list[str], typer.Argument(help="resource=limit, -1 for unlimited")],
) -> None:
    """Change the cloud's defaults (cloud-admin); every replica applies them at once."""
    parsed = _parse_limits(limits)
    _update_defaults(ctx, parsed, list(parsed))


@quota_app.command("reset-default")
def quota_reset_default(
    ctx: typer.Context,
    resources: Annotated[list[str], typer.Argument(help="Resources back to the built-in default.")],
) -> None:
    """Put the cloud's default of resources back to the built-in one."""
    _update_defaults(ctx, {}, resources)


def _update_defaults(ctx: typer.Context, limits: dict[str, int], resources: list[str]) -> None:
    mask = field_mask_pb2.FieldMask(paths=[f"limits.{name}" for name in resources])
    reply = call(ctx, lambda s: s.UpdateDefaultQuota(P.UpdateDefaultQuotaRequest(
        quota=P.Quota(limits=limits), update_mask=mask)))
    cli_context.get(ctx).output.table(_limits_rows(dict(reply.limits), "limit"),
                                      ["resource", "limit"], title="default quota")


@quota_app.command("reset")
def quota_reset(
    ctx: typer.Context,
    resources: Annotated[list[str], typer.Argument(
        metavar="[PROJECT] RESOURCE...",
        help="Resources back to the default; without --project, the first of two or more "
             "is the project.")],
    project: ProjectOption = "",
) -> None:
    """Put limits of a project back to the cloud's default."""
    project, rest = _project_and_rest(project, resources, lambda _: len(resources) > 1)
    _update_quota(ctx, project, {}, rest)


def _update_quota(ctx: typer.Context, project: str, limits: dict[str, int],
                  resources: list[str]) -> None:
    """Change the named limits: to their value in `limits`, or to the default when absent."""
    mask = field_mask_pb2.FieldMask(paths=[f"limits.{name}" for name in resources])

    async def run(s: Stub) -> Any:
        quota = P.Quota(project_id=await project_id(s, project), limits=limits)
        return await s.UpdateQuota(P.UpdateQuotaRequest(quota=quota, update_mask=mask))
    reply = call(ctx, run)
    cli_context.get(ctx).output.table(
        _limits_rows(dict(reply.limits), "limit"), ["resource", "limit"],
        title=f"quota of project {project or reply.project_id}")


@quota_app.command("usage")
def quota_usage(ctx: typer.Context, positional: ProjectArgument = "",
                project: ProjectOption = "") -> None:
    """Show what a project uses of each limited resource."""
    project = project or positional
    async def run(s: Stub) -> Any:
        return await s.GetUsage(P.GetUsageRequest(project_id=await project_id(s, project)))
    reply = call(ctx, run)
    cli_context.get(ctx).output.table(
        _limits_rows(dict(reply.in_use), "in_use"), ["resource", "in_use"],
        title=f"usage of project {project or reply.project_id}")


@catalog_app.command("list")
def catalog_list(ctx: typer.Context,
                 name: Annotated[str, typer.Option(help="Only this service.")] = "") -> None:
    """List the service catalog: every live endpoint of every service."""
    reply = call(ctx, lambda s: s.ListEndpoints(P.ListEndpointsRequest(name=name)))
    cli_context.get(ctx).output.table([message_to_row(e) for e in reply.endpoints],
                                      ["name", "address", "service", "instance_id"])
