"""Catalog registration: each service publishes its endpoint under an etcd lease at start.

The entry disappears by itself when the process dies (its lease lapses), so
identity's ListEndpoints only ever returns live endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2
from nubis.identity.v1 import identity_pb2

from services.common.store import Lease, Store

if TYPE_CHECKING:
    from services.common.server import RunningServer

CATALOG_PREFIX = "identity/catalog/"
# Seconds an entry survives its process; refreshed every ttl/3.
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


async def register(
    store: Store, name: str, service: str, address: str, *, version: str = "",
    ttl: int = DEFAULT_TTL,
) -> Registration:
    """Publish `address` for service `name` (e.g. compute) until withdrawn or dead."""
    instance_id = uuid.uuid4().hex[:12]
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    entry = identity_pb2.Endpoint(
        service=service, name=name, address=address, instance_id=instance_id,
        version=version, register_time=stamp,
    )
    lease = await store.grant_lease(ttl)
    key = f"{endpoint_prefix(name)}{instance_id}"
    await store.create(key, entry, lease=lease)
    return Registration(store, key, lease, store.keep_alive(lease))


async def keep_registered(
    store: Store, name: str, service: str, address: str, *, ttl: int = DEFAULT_TTL
) -> None:
    """Stay in the catalog until cancelled: a `ServiceParts.background` coroutine.

    Background coroutines start once the server is serving, so the endpoint is
    only advertised when it can answer. Cancellation (shutdown) withdraws it.
    """
    registration = await register(store, name, service, address, ttl=ttl)
    try:
        await registration.keeper
    finally:
        await registration.withdraw()


def keep_server_registered(
    store: Store, name: str, service: str, *, ttl: int = DEFAULT_TTL
) -> Callable[[RunningServer], Coroutine[Any, Any, None]]:
    """A `ServiceParts.background` factory advertising the address the server bound.

    The configured port may be 0 (tests, labs): only the started server knows
    the real one, so the entry is made from `RunningServer.address`.
    """

    def job(running: RunningServer) -> Coroutine[Any, Any, None]:
        return keep_registered(store, name, service, running.address, ttl=ttl)

    return job
