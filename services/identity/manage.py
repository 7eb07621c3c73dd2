"""`nubis-manage`: operator actions that need etcd itself (first admin, signing-key rotation).

`bootstrap` is idempotent: it makes the admin project, the cloud-admin user
and its roles, the cloud's quota defaults (from the settings) and, when
`service_auth` holds a password, the service user services call each other
with, if missing; and it can write the admin's credentials (address, name,
password, a fresh token) to a 0600 JSON file the `nubis` CLI reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import make_channel
from services.common import errors
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.identity import bootstrap as admin_bootstrap
from services.identity import token

app = typer.Typer(name="nubis-manage", help="Operate a nubis cloud's identity store.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


def _existing_password(path: Path | None) -> str | None:
    """A password already written to the credentials file (a re-run keeps it)."""
    if path is None or not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    found = data.get("password")
    return found if isinstance(found, str) and found else None


def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(data, handle, indent=2)


async def _login(
    address: str, settings: Settings, password: str
) -> identity_pb2.AuthenticateResponse:
    channel = make_channel(address, settings=settings.tls)
    try:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        return await stub.Authenticate(identity_pb2.AuthenticateRequest(
            username=settings.auth.admin_user, password=password,
            project=settings.auth.admin_project), timeout=30)
    finally:
        await channel.close()


async def _bootstrap(
    settings: Settings, password: str, service_password: str | None = None
) -> tuple[admin_bootstrap.Admin, admin_bootstrap.ServiceUser | None]:
    store = await Store.connect(settings.etcd.endpoints, root=settings.etcd.prefix,
                                timeout=settings.etcd.timeout)
    try:
        await admin_bootstrap.ensure_quota_defaults(store, settings.quota)
        admin = await admin_bootstrap.ensure_admin(store, settings.auth, password)
        service = None
        if service_password is not None:
            service = await admin_bootstrap.ensure_service_user(
                store, settings.auth, settings.service_auth, service_password)
        return admin, service
    finally:
        await store.close()


@app.command()
def bootstrap(
    write_credentials: Annotated[Path | None, typer.Option(
        help="Write the admin's credentials (and a token) to this JSON file (mode 0600).")] = None,
    identity: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", help="Identity address to fetch a token from (default: settings).",
    )] = None,
) -> None:
    """Create the admin project and cloud-admin user (and the service user, when
    service_auth has a password) if they do not exist yet."""
    settings = load_settings()
    password = (settings.auth.admin_password or _existing_password(write_credentials)
                or secrets.token_urlsafe(18))
    try:
        service_password = settings.service_auth.secret()
    except errors.NubisError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    admin, service = asyncio.run(_bootstrap(settings, password, service_password))
    typer.echo(f"admin user {settings.auth.admin_user} ({admin.user_id}) in project "
               f"{settings.auth.admin_project} ({admin.project_id})"
               + (" created" if admin.created else " already present"))
    if service is not None:
        typer.echo(f"service user {settings.service_auth.user} ({service.user_id}) in project "
                   f"{settings.service_auth.project} ({service.project_id}) {service.outcome}")
    if write_credentials is None:
        if admin.created and not settings.auth.admin_password:
            typer.echo("generated admin password (shown once): " + password)
        return
    address = identity or settings.identity.advertised_address()
    reply = asyncio.run(_login(address, settings, password))
    _write_private(write_credentials, {
        "identity": address, "username": settings.auth.admin_user,
        "project": settings.auth.admin_project, "password": password,
        "token": reply.token, "expires": reply.expire_time.ToJsonString(),
    })
    typer.echo(f"admin credentials written to {write_credentials}")


@app.command("rotate-signing-key")
def rotate_signing_key() -> None:
    """Sign new tokens with a fresh key; tokens signed by older keys keep verifying."""
    settings = load_settings()

    async def rotate() -> str:
        store = await Store.connect(settings.etcd.endpoints, root=settings.etcd.prefix,
                                    timeout=settings.etcd.timeout)
        try:
            return (await token.rotate(store)).kid
        finally:
            await store.close()

    typer.echo(f"new signing key {asyncio.run(rotate())}")


def main() -> None:
    app(prog_name="nubis-manage")


if __name__ == "__main__":
    main()
