"""Catalog registration: each service publishes its endpoint under an etcd lease at start.

The entry disappears by itself when the process dies (its lease lapses), so
identity's ListEndpoints only ever returns live endpoints. A live process
whose lease lapsed anyway (etcd out of reach for longer than the TTL) writes
its entry again under a new lease as soon as etcd answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from google.protobuf import timestamp_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, supervise
from services.common.store import Lease, Store, Txn

if TYPE_CHECKING:
    from services.common.server import RunningServer

log = structlog.get_logger(__name__)

CATALOG_PREFIX = "identity/catalog/"
# Seconds an entry survives its process (settings.catalog_ttl); refreshed every ttl/3.
DEFAULT_TTL = 10


def endpoint_prefix(name: str) -> str:
    return f"{CATALOG_PREFIX}{name}/"


@dataclass
class Registration:
    """A live catalog entry; `withdraw` removes it at once (clean shutdown)."""

    store: Store
    key: str
    lease: Lease
    keeper: asyncio.Task[None]

    async def withdraw(self) -> None:
        self.keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.keeper
        with contextlib.suppress(Exception):
            await self.store.revoke_lease(self.lease)


def _entry(name: str, service: str, address: str, version: str) -> identity_pb2.Endpoint:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return identity_pb2.Endpoint(
        service=service, name=name, address=address, instance_id=uuid.uuid4().hex[:12],
        version=version, register_time=stamp,
    )


async def _publish(store: Store, entry: identity_pb2.Endpoint, ttl: int) -> Registration:
    """Write `entry` under a new lease and keep the lease alive."""
    lease = await store.grant_lease(ttl)
    key = f"{endpoint_prefix(entry.name)}{entry.instance_id}"

    async def body(txn: Txn) -> None:
        # A put, not a create: the key is this process's own (its instance id),
        # and a retried write that already landed must not read as a conflict.
        txn.put(key, entry, lease=lease)

    try:
        await store.atomic(body)
    except BaseException:
        await _revoke_quietly(store, lease)
        raise
    return Registration(store, key, lease, store.keep_alive(lease))


async def _revoke_quietly(store: Store, lease: Lease) -> None:
    with contextlib.suppress(Exception):
        await store.revoke_lease(lease)


async def register(
    store: Store, name: str, service: str, address: str, *, version: str = "",
    ttl: int = DEFAULT_TTL,
) -> Registration:
    """Publish `address` for service `name` (e.g. compute) until withdrawn or dead."""
    return await _publish(store, _entry(name, service, address, version), ttl)


async def _stay_published(store: Store, entry: identity_pb2.Endpoint, ttl: int) -> None:
    """Publish `entry`, and publish it again each time its lease is lost; never returns."""
    while True:
        registration = await _publish(store, entry, ttl)
        try:
            await registration.keeper
        except errors.NotFound:
            # The lease lapsed while etcd was out of reach: the entry went with it.
            log.warning("catalog entry lost with its lease; registering again",
                        service=entry.name, instance=entry.instance_id)
        finally:
            await registration.withdraw()


async def keep_registered(
    store: Store, name: str, service: str, address: str, *, ttl: int = DEFAULT_TTL,
    restart_policy: supervise.RestartPolicy | None = None,
) -> None:
    """Stay in the catalog until cancelled: a `ServiceParts.background` coroutine.

    Background coroutines start once the server is serving, so the endpoint is
    only advertised when it can answer. While etcd is out of reach the write is
    retried with backoff; an entry whose lease lapsed is written again (same
    instance id). Cancellation (shutdown) withdraws it.
    """
    entry = _entry(name, service, address, "")
    await supervise.supervise(f"catalog-{name}", lambda: _stay_published(store, entry, ttl),
                              restart_policy)


def keep_server_registered(
    store: Store, name: str, service: str, *, ttl: int = DEFAULT_TTL
) -> Callable[[RunningServer], Coroutine[Any, Any, None]]:
    """A `ServiceParts.background` factory advertising the address the server bound.

    The configured port may be 0 (tests, labs): only the started server knows
    the real one, so the entry is made from `RunningServer.address` (the
    endpoint's advertised host, never a wildcard such as 0.0.0.0).
    """

    def job(running: RunningServer) -> Coroutine[Any, Any, None]:
        return keep_registered(store, name, service, running.address, ttl=ttl)

    return job
