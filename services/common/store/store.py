"""The Store: typed protobuf values in etcd under one root, with failover across members.

Every nubis service reaches etcd only through this class. Keys are relative to
the root (``compute/instances/<id>``); values are protobuf messages; every
write compares revisions so racing replicas never lose an update.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from aetcd import rpc
from google.protobuf.message import Message

from services.common.settings import EtcdSettings
from services.common.store import buckets, client, keys, kv, lease, mirror, txn, watch
from services.common.store.types import Lease, M, Page, Versioned, WatchEvent

T = TypeVar("T")


class Store:
    """A connection to etcd holding nubis state. Build it with `Store.connect`."""

    def __init__(self, conn: client.Connection, keyspace: keys.Keyspace) -> None:
        self._conn = conn
        self._ks = keyspace
        self._mirrors: dict[str, mirror.Mirror[Any]] = {}
        self._buckets = buckets.LeaseBuckets(self.grant_lease)

    @classmethod
    async def connect(
        cls,
        endpoints: builtins.list[str],
        *,
        root: str = "/nubis",
        timeout: float = 5.0,  # noqa: ASYNC109 - per-call etcd deadline, not this call's
    ) -> Store:
        """Connect to the etcd members at `endpoints`; Unavailable if none answers."""
        store = cls(client.Connection(endpoints, timeout), keys.Keyspace(root))
        try:
            await store.revision()
        except BaseException:
            await store.close()
            raise
        return store

    @classmethod
    async def from_settings(cls, settings: EtcdSettings) -> Store:
        """`connect` with the endpoints, root prefix and timeout of the settings."""
        return await cls.connect(settings.endpoints, root=settings.prefix,
                                 timeout=settings.timeout)

    async def close(self) -> None:
        await self._conn.close()

    @property
    def root(self) -> str:
        """The etcd prefix all keys live under, e.g. ``/nubis``."""
        return self._ks.root

    @property
    def endpoint(self) -> str:
        """host:port of the etcd member in use right now."""
        return self._conn.endpoint

    async def revision(self) -> int:
        """The current revision of the whole etcd keyspace."""
        request = rpc.RangeRequest(key=self._ks.base, count_only=True)
        response = await kv.range_request(self._conn, request)
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        """Discard the history before `revision` (etcd also does this on its own, periodically)."""
        await kv.compact(self._conn, revision)

    async def get(self, key: str, msg_type: type[M]) -> Versioned[M]:
        """The value at `key`; NotFound if there is none."""
        return await kv.get(self._conn, self._ks, key, msg_type)

    async def find(self, key: str, msg_type: type[M]) -> Versioned[M] | None:
        """The value at `key`, or None."""
        return await kv.find(self._conn, self._ks, key, msg_type)

    async def list(
        self, prefix: str, msg_type: type[M], *, page_size: int = 100, page_token: str = ""
    ) -> Page[M]:
        """One page of the values under `prefix` in key order; pages share one revision."""
        return await kv.list_page(self._conn, self._ks, prefix, msg_type, page_size, page_token)

    async def list_all(
        self, prefix: str, msg_type: type[M], *, on_undecodable: kv.Undecodable | None = None
    ) -> tuple[builtins.list[Versioned[M]], int]:
        """All values under `prefix` and the revision they were read at.

        A value that is not a `msg_type` fails the listing (FailedPrecondition),
        or, given `on_undecodable`, is reported to it (key, mod_revision) and left out.
        """
        return await kv.list_all(self._conn, self._ks, prefix, msg_type, on_undecodable)

    def mirror(self, prefix: str, msg_type: type[M]) -> mirror.Mirror[M]:
        """This store's mirror of `prefix` (`mirror.Mirror`: `read` answers what `list_all`
        does, reading only what changed since its last read); one per prefix, made on
        first use. Its answers are shared: callers must not change them."""
        made = self._mirrors.get(prefix)
        if made is None:
            made = self._mirrors[prefix] = mirror.Mirror(self._conn, self._ks, prefix, msg_type)
        if made.msg_type is not msg_type:
            raise TypeError(f"the mirror of {prefix!r} holds {made.msg_type.__name__} values")
        found: mirror.Mirror[M] = made
        return found

    async def list_at(self, prefix: str, msg_type: type[M],
                      revision: int) -> builtins.list[Versioned[M]]:
        """All values under `prefix` as they were at `revision` (what a watch from there
        needs to know of keys deleted since); FailedPrecondition ``nubis.store.compacted``
        once that history is gone."""
        return await kv.list_at(self._conn, self._ks, prefix, msg_type, revision)

    async def create(self, key: str, msg: M, *, lease: Lease | None = None) -> Versioned[M]:
        """Create `key`; AlreadyExists if it exists."""
        lease_id = 0 if lease is None else lease.id
        return await kv.create(self._conn, self._ks, key, msg, lease_id)

    async def update(
        self,
        key: str,
        msg_type: type[M],
        mutate: Callable[[M], M | None],
        *,
        retries: int = 16,
    ) -> Versioned[M]:
        """Read-modify-write `key`; `mutate` may raise a domain error to abort.

        Retries on a concurrent write (Conflict when retries run out). A
        mutation that changes nothing writes nothing.
        """
        return await kv.update(self._conn, self._ks, key, msg_type, mutate, retries)

    async def replace(self, key: str, msg: M, *, expect_revision: int) -> Versioned[M]:
        """Overwrite `key` if it is still at `expect_revision` (Conflict otherwise)."""
        return await kv.replace(self._conn, self._ks, key, msg, expect_revision)

    async def delete(self, key: str, *, expect_revision: int | None = None) -> None:
        """Delete `key` (NotFound if absent; Conflict if it moved past `expect_revision`)."""
        await kv.delete(self._conn, self._ks, key, expect_revision)

    async def atomic(
        self, body: Callable[[txn.Txn], Awaitable[T]], *, retries: int = 16,
        deadline: float | None = None,
    ) -> T:
        """Run `body` and commit its writes in one transaction; rerun it on conflicts.

        With `deadline` (event loop time) conflicts are rerun until it passes
        rather than `retries` times.
        """
        return await txn.atomic(self._conn, self._ks, body, retries, self._buckets.forget,
                                deadline)

    def watch(
        self, prefix: str, msg_type: type[M], *, start_revision: int,
        on_undecodable: kv.Undecodable | None = None,
    ) -> AsyncIterator[WatchEvent[M]]:
        """Every change under `prefix` from `start_revision` on, in order, none twice.

        An undecodable put fails the watch, or is reported to `on_undecodable` and skipped.
        """
        return watch.watch(self._conn, self._ks, prefix, msg_type, start_revision,
                           on_undecodable)

    async def grant_lease(self, ttl: int) -> Lease:
        """A new lease living `ttl` seconds unless refreshed."""
        return await lease.grant(self._conn, ttl)

    async def shared_lease(self, deadline: float, *, width: int) -> Lease:
        """A lease this process shares among keys that may vanish after `deadline`.

        `deadline` is in epoch seconds; the lease ends at most `width` seconds
        after it (plus a few), and every deadline in the same `width`-second
        bucket gets the same lease. Ask for it inside an `atomic` body: a commit
        that finds it gone runs the body again, which then gets a fresh one.
        """
        return await self._buckets.lease_until(deadline, width)

    async def leases(self) -> builtins.list[int]:
        """Ids of every lease etcd holds now, granted by any process."""
        return await lease.list_ids(self._conn)

    async def refresh_lease(self, the_lease: Lease) -> None:
        """Reset the lease's ttl (NotFound if it already expired)."""
        await lease.refresh(self._conn, the_lease)

    async def lease_time_to_live(self, lease_id: int) -> int:
        """Seconds the lease `lease_id` (e.g. a `Versioned.lease`) has left; -1 once it is gone."""
        return await lease.time_to_live(self._conn, lease_id)

    async def revoke_lease(self, the_lease: Lease) -> None:
        """End the lease now, deleting every key attached to it."""
        await lease.revoke(self._conn, the_lease)

    def keep_alive(self, the_lease: Lease) -> asyncio.Task[None]:
        """A task that refreshes the lease every ttl/3 until cancelled."""
        return lease.keep_alive(self._conn, the_lease)


__all__ = ["Message", "Store"]
