"""What the storage and network commands share: where a service is, one session of calls
per command, every page of a List, names or ids, flat rows, and waiting for a state.

A service's address is, in order: `NUBIS_<SERVICE>_ADDR`, identity's catalog
(its first replica that accepts a connection, as the SDK picks it: so a replica
that died, still listed until its lease expires, is skipped for a live one),
the lab's recorded endpoint (lab.json), then the service's default port.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
import typer
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client import cli_context
from services.client.channel import CallPolicy, make_channel
from services.client.output import message_to_row
from services.client.sdk import cloud as sdk_cloud
from services.common import errors
from services.common.resources import is_uuid as is_uuid
from services.common.settings import Settings

T = TypeVar("T")
# Seconds a catalog lookup may take before the default address is used instead.
_CATALOG_TIMEOUT = 3.0
# Largest page the services serve; fewer round trips for long lists.
PAGE_SIZE = 1000


async def service_address(cli: cli_context.CliContext, service: str) -> str:
    """host:port of `service` ("storage", "network"): env, catalog, lab, default."""
    return (os.environ.get(f"NUBIS_{service.upper()}_ADDR") or await _from_catalog(cli, service)
            or configured_address(cli, service) or _default_address(service))


def configured_address(cli: cli_context.CliContext, service: str) -> str | None:
    """host:port of `service` given by NUBIS_<SERVICE>_ADDR, else by the lab, else None."""
    explicit = os.environ.get(f"NUBIS_{service.upper()}_ADDR")
    if explicit:
        return explicit
    try:
        lab = json.loads((cli.lab_dir / "lab.json").read_text())
    except (OSError, ValueError):
        lab = {}
    endpoint = lab.get("endpoints", {}).get(f"nubis-{service}") if isinstance(lab, dict) else None
    return endpoint if isinstance(endpoint, str) else None


async def _from_catalog(cli: cli_context.CliContext, service: str) -> str | None:
    try:
        # One attempt: without a catalog the default address is tried at once.
        async with make_channel(cli.identity_address(), settings=cli.tls(), token=cli.token(),
                                policy=CallPolicy(max_attempts=1)) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            reply = await stub.ListEndpoints(identity_pb2.ListEndpointsRequest(name=service),
                                             timeout=_CATALOG_TIMEOUT)
    except grpc.aio.AioRpcError:
        return None
    listed = [endpoint.address for endpoint in reply.endpoints]
    return await sdk_cloud.first_live(listed, cli.tls()) if listed else None


def _default_address(service: str) -> str:
    endpoint = Settings.model_fields[service].get_default(call_default_factory=True)
    return f"127.0.0.1:{endpoint.port}"


def run(ctx: typer.Context, service: str, stub_type: Callable[[grpc.aio.Channel], Any],
        action: Callable[[Any], Awaitable[T]], policy: CallPolicy | None = None) -> T:
    """Run `action(stub)` against `service` with the invocation's address and token."""
    cli = cli_context.get(ctx)

    async def go() -> T:
        address = await service_address(cli, service)
        async with make_channel(address, settings=cli.tls(), token=cli.token(),
                                policy=policy) as channel:
            return await action(stub_type(channel))

    return asyncio.run(go())


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
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def finished(current: Any) -> bool:
        if current is None:
            return True
        problem = failed(current)
        if problem:
            raise errors.FailedPrecondition(problem, reason="nubis.cli.operation_failed")
        return False

    await wait_for(absent, finished, within=within, what=what)

