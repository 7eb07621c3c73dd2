"""`nubis login` and `nubis token issue|revoke`: getting and dropping tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from nubis.identity.v1 import identity_pb2

from services.client import cli_context
from services.client.commands.identity import call

token_app = typer.Typer(help="Tokens: issue one, or revoke one.", no_args_is_help=True)

Username = Annotated[str, typer.Option("--username", "-u", prompt=True)]
Password = Annotated[str, typer.Option("--password", prompt=True, hide_input=True,
                                       envvar="NUBIS_PASSWORD")]
Project = Annotated[str, typer.Option("--project", "-p",
                                      help="Project id or name (default: the user's).")]


def credentials_path(cli: cli_context.CliContext) -> Path:
    """Where login stores credentials: the lab's dir when inside a lab, else ~/.config/nubis."""
    if (cli.lab_dir / "lab.json").is_file():
        return cli.lab_dir / cli_context.CREDENTIALS_FILE
    return cli_context.user_config_dir() / cli_context.CREDENTIALS_FILE


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
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
    cli.output.note(f"logged in as {username} on project {reply.project_id} "
                    f"(roles: {', '.join(reply.roles)}); token saved to {path}")


@token_app.command("issue")
def token_issue(ctx: typer.Context, username: Username, password: Password,
                project: Project = "") -> None:
    """Print a new token (for scripts: `-o json`), without saving it."""
    reply = _authenticate(ctx, username, password, project)
    cli_context.get(ctx).output.record({
        "token": reply.token, "token_id": reply.token_id, "user_id": reply.user_id,
        "project_id": reply.project_id, "roles": list(reply.roles),
        "expires": reply.expire_time.ToJsonString(),
    }, title="token")


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
