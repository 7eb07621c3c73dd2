"""`nubis login|logout` and `nubis token issue|revoke`: getting and dropping tokens.

Credentials are kept at mode 0600 (their directory 0700) in the user's config
dir, the lab's dir inside a lab, or the named cloud's credentials file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from nubis.identity.v1 import identity_pb2

from services.client import cli_context, rpc_errors
from services.client.commands.identity import call
from services.common import errors

token_app = typer.Typer(help="Tokens: issue one, or revoke one.", no_args_is_help=True)

Username = Annotated[str, typer.Option("--username", "-u", prompt=True,
                                       help="User name (asked for when not given).")]
Password = Annotated[str, typer.Option("--password", prompt=True, hide_input=True,
                                       envvar="NUBIS_PASSWORD",
                                       help="Password (asked for when not given; not kept).")]
LoggedInUser = Annotated[str, typer.Option(
    "--username", "-u", help="User name (default: the one of `nubis login`).")]
Project = Annotated[str, typer.Option("--project", "-p",
                                      help="Project id or name (default: the user's).")]


def credentials_path(cli: cli_context.CliContext) -> Path:
    """Where login stores credentials (see CliContext.credentials_path)."""
    return cli.credentials_path()


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file made earlier with a wider mode is narrowed too
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle, indent=2)


def _authenticate(ctx: typer.Context, username: str, password: str,
                  project: str) -> identity_pb2.AuthenticateResponse:
    request = identity_pb2.AuthenticateRequest(username=username, password=password,
                                               project=project)
    return call(ctx, lambda stub: stub.Authenticate(request))


def login(ctx: typer.Context, username: Username, password: Password,
          project: Project = "") -> None:
    """Authenticate and keep the token for the following commands (the password is not kept)."""
    cli = cli_context.get(ctx)
    reply = _authenticate(ctx, username, password, project)
    path = credentials_path(cli)
    _save(path, {"identity": cli.identity_address(), "username": username,
                 "project": reply.project_id, "token": reply.token,
                 "expires": reply.expire_time.ToJsonString()})
    cli.output.note(f"logged in as {username} on project {project or reply.project_id} "
                    f"(roles: {', '.join(reply.roles)}); token saved to {path}")


def saved_login(cli: cli_context.CliContext) -> dict[str, Any]:
    """What `nubis login` saved (username, project, token), or {}."""
    try:
        data = json.loads(credentials_path(cli).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


NewPassword = Annotated[str, typer.Option(
    "--password", envvar="NUBIS_PASSWORD",
    help="Issue a new token with this password (default: show the current login's token; "
         "asked for when there is none).")]


@token_app.command("issue")
def token_issue(ctx: typer.Context, password: NewPassword = "", username: LoggedInUser = "",
                project: Project = "") -> None:
    """Print the current login's token, or with --password a new one (for scripts: `-o json`),
    without saving it."""
    cli = cli_context.get(ctx)
    saved = saved_login(cli)
    token = saved.get("token")
    if not password and not username and isinstance(token, str) and token:
        user = str(saved.get("username") or "the current login")
        cli.output.record({"token": token, "project_id": saved.get("project", ""),
                           "expires": saved.get("expires", "")}, title=f"token of {user}")
        return
    if not username and saved.get("username"):  # the login's user, on the login's project
        username, project = str(saved["username"]), project or str(saved.get("project") or "")
    username = username or typer.prompt("Username")
    password = password or typer.prompt("Password", hide_input=True)
    reply = _authenticate(ctx, username, password, project)
    cli.output.record({
        "token": reply.token, "token_id": reply.token_id, "user_id": reply.user_id,
        "project_id": reply.project_id, "roles": list(reply.roles),
        "expires": reply.expire_time.ToJsonString(),
    }, title=f"token of {username}")


def logout(ctx: typer.Context) -> None:
    """Revoke the saved token and forget it."""
    cli = cli_context.get(ctx)
    path = credentials_path(cli)
    token = saved_login(cli).get("token")
    if not path.is_file():
        cli.output.note("not logged in")
        return
    if isinstance(token, str) and token:
        request = identity_pb2.RevokeTokenRequest(token=token)
        try:
            call(ctx, lambda stub: stub.RevokeToken(request))
        except errors.NubisError as exc:  # expired or unreachable: still forgotten here
            cli.output.note(f"the token was not revoked ({rpc_errors.describe_error(exc)})")
    path.unlink()
    cli.output.note(f"logged out; removed {path}")


@token_app.command("revoke")
def token_revoke(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="Token to revoke (default: the saved one).")] = "",
    token_id: Annotated[str, typer.Option("--id", help="Revoke by id (cloud-admin).")] = "",
) -> None:
    """Revoke a token everywhere within seconds."""
    cli = cli_context.get(ctx)
    target = token or ("" if token_id else (cli.token() or ""))
    if not target and not token_id:
        raise typer.BadParameter("no token given and none saved")
    request = identity_pb2.RevokeTokenRequest(token=target, token_id=token_id)
    call(ctx, lambda stub: stub.RevokeToken(request))
    cli.output.note("token revoked")
