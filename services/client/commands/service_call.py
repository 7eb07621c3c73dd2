"""What the commands share: one SDK `Cloud` per command, every page of a List, names or
ids, flat rows, and waiting for a state.

Every command calls through the SDK (services.client.sdk): the typed clients
of services.client.peers.stubs with their deadlines, retries on UNAVAILABLE
where a repeat is safe, and the services' errors raised as
services.common.errors classes (cli.run prints them). A service is found in
identity's catalog, its replicas in turn, unless `NUBIS_<SERVICE>_ADDR` names
its address.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc.aio
import typer

from services.client import cli_context
from services.client.channel import CallPolicy
from services.client.output import message_to_row
from services.client.peers import stubs
from services.client.peers.settings import ClientSettings
from services.client.sdk import cloud as sdk_cloud
from services.common import errors
from services.common.resources import is_uuid as is_uuid

T = TypeVar("T")
# Attempts of a call that finds a replica (or identity, for the catalog) unavailable. Fewer
# than a service's: a command with no cloud to reach says so within about a second, with
# the address that refused, instead of retrying until the call's deadline.
ATTEMPTS = 3
# Largest page the services serve; fewer round trips for long lists.
PAGE_SIZE = 1000


def pinned_endpoints() -> dict[str, str]:
    """The services `NUBIS_<SERVICE>_ADDR` points at an address instead of the catalog's."""
    found = {}
    for client in stubs.CLIENTS:
        address = os.environ.get(f"NUBIS_{client.NAME.upper()}_ADDR")
        if address and client is not stubs.IdentityClient:
            found[client.NAME] = address
    return found


def cloud(cli: cli_context.CliContext) -> sdk_cloud.Cloud:
    """The SDK's Cloud of this invocation: its identity, TLS and token (none: calls go
    without one, and the service's UNAUTHENTICATED is printed with `nubis login` as the fix)."""
    settings = ClientSettings(identity_address=cli.identity_address(), credential=None,
                              tls=cli.tls(), endpoints=pinned_endpoints(), attempts=ATTEMPTS)
    return sdk_cloud.Cloud(settings, token=cli.token() or "")


def with_cloud(ctx: typer.Context, action: Callable[[sdk_cloud.Cloud], Awaitable[T]]) -> T:
    """Run `action(cloud)` with this invocation's Cloud, closed after it."""
    cli = cli_context.get(ctx)

    async def go() -> T:
        async with cloud(cli) as made:
            return await action(made)

    return asyncio.run(go())


def run(ctx: typer.Context, service: str, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run `action(client)` with the SDK's typed client of `service` ("compute", ...)."""
    async def go(made: sdk_cloud.Cloud) -> T:
        return await action(getattr(made, service))

    return with_cloud(ctx, go)


async def raw_stub(made: sdk_cloud.Cloud, service: str,
                   stub_type: Callable[[grpc.aio.Channel], T],
                   policy: CallPolicy | None = None) -> T:
    """A generated stub of `service` on a raw channel to its first live replica, with the
    Cloud's token on every call: only for what the typed clients do not do (a client
    stream, a channel's own flow-control window). Its failures are grpc errors, which
    cli.run prints as it prints the SDK's."""
    return stub_type(await made.channel(service, policy=policy))


def request_id() -> str:
    """One idempotency key per command run: a retried create returns what the first made."""
    return str(uuid.uuid4())


async def every_page(fetch: Callable[[str], Awaitable[tuple[Iterable[T], str]]]) -> list[T]:
    """Follow next_page_token to the end."""
    items: list[T] = []
    token = ""
    while True:
        page, token = await fetch(token)
        items += page
        if not token:
            return items


@dataclass(frozen=True)
class Kind:
    """How to find one kind of resource by name: its word and its List (filter -> items)."""

    word: str
    lookup: Callable[[str], Awaitable[list[Any]]]
    key: str = "name"

    async def id_of(self, ref: str) -> str:
        """The id of the resource given by id or by its unique `key` ("" stays "")."""
        if not ref or is_uuid(ref):
            return ref
        if any(ch.isspace() or ch in ",=" for ch in ref):
            raise errors.InvalidArgument(f"{self.word} {ref!r} is neither an id nor a plain name",
                                         reason="nubis.cli.bad_reference")
        found = await self.lookup(f"{self.key}={ref}")
        if len(found) != 1:
            if not found:
                raise errors.NotFound(f"no {self.word} named {ref!r}",
                                      reason="nubis.cli.no_such_name")
            raise errors.FailedPrecondition(f"more than one {self.word} named {ref!r}; "
                                            "give its id", reason="nubis.cli.ambiguous_name")
        return str(found[0].meta.id)

    async def ids_of(self, refs: Iterable[str]) -> list[str]:
        return [await self.id_of(ref) for ref in refs]


def flat(resource: Any, **extra: Any) -> dict[str, Any]:
    """A resource as one flat row: its meta fields beside its own, enums without prefixes."""
    row = message_to_row(resource)
    meta = row.pop("meta", {})
    return {**meta, **row, **extra}


def state_name(resource: Any) -> str:
    """The resource's state as an operator reads it: AVAILABLE, not STATE_AVAILABLE."""
    return str(resource.State.Name(resource.state))


async def wait_for(fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], *,
                   within: float, what: str, interval: float = 0.5) -> T:
    """Poll `fetch` until `done` says so; Unavailable naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        current = await fetch()
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise errors.Unavailable(f"{what} did not finish within {within:.0f}s",
                                     reason="nubis.cli.wait_timeout")
        await asyncio.sleep(interval)


async def wait_gone(fetch: Callable[[], Awaitable[Any]], *, within: float, what: str,
                    failed: Callable[[Any], str | None] = lambda _: None) -> None:
    """Poll `fetch` until it answers NOT_FOUND; `failed(resource)` names an error state."""
    async def absent() -> Any:
        try:
            return await fetch()
        except errors.NotFound:
            return None

    def finished(current: Any) -> bool:
        if current is None:
            return True
        problem = failed(current)
        if problem:
            raise errors.FailedPrecondition(problem, reason="nubis.cli.operation_failed")
        return False

    await wait_for(absent, finished, within=within, what=what)

