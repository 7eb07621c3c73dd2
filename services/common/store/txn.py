"""Multi-key transactions in the style of etcd's STM: read, decide, commit or run again.

A body reads keys through `Txn.get` (each read records a compare on that key's
mod_revision, or on its absence) and buffers writes. The commit is one etcd
transaction: the compares, then the writes. If any key moved, the failure
branch returns the fresh values of every key involved, and the body runs again
on them without re-reading. All reads of one run see a single revision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aetcd import rpc
from google.protobuf.message import Message

from services.common import errors
from services.common.store import client, history, keys, kv
from services.common.store.types import Lease, M, Versioned

T = TypeVar("T")

LEASE_NOT_FOUND = "nubis.store.lease_not_found"


@dataclass(frozen=True, slots=True)
class _Write:
    kind: Literal["put", "create", "delete"]
    key: str
    data: bytes = b""
    lease: int = 0


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a lost commit learned: fresh key-values at one revision."""

    kvs: dict[bytes, Any]
    revision: int


@dataclass(frozen=True, slots=True)
class _Known:
    """A key-value the caller already held (see `Txn.assume`), shaped like etcd's."""

    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


class Txn:
    """One run of an `atomic` body: recorded reads and buffered writes."""

    def __init__(self, conn: client.Connection, ks: keys.Keyspace, seed: _Snapshot) -> None:
        self._conn = conn
        self._ks = ks
        self._cache: dict[bytes, Any] = dict(seed.kvs)
        self._revision = seed.revision
        self._reads: dict[bytes, int] = {}
        self._writes: dict[bytes, _Write] = {}
        self._assumed: set[bytes] = set()
        self.committed_revision = 0
        """The revision the commit landed at (0 until it did, or if it wrote nothing)."""

    async def get(self, key: str, msg_type: type[M]) -> Versioned[M] | None:
        """The value of `key` as this transaction sees it (its own writes included)."""
        full = self._ks.key(key)
        write = self._writes.get(full)
        if write is not None:
            if write.kind == "delete":
                return None
            seen = self._reads.get(full, 0)
            return Versioned(key, kv.decode(msg_type, write.data, key), seen, seen)
        if full in self._cache:
            found = self._cache[full]
        else:
            found = await self._fetch(full)
        self._reads[full] = found.mod_revision if found is not None else 0
        if found is None:
            return None
        return Versioned(
            key, kv.decode(msg_type, found.value, key), found.mod_revision, found.create_revision,
            found.lease,
        )

    async def get_many(
        self, wanted: Sequence[tuple[str, type[Message]]]
    ) -> list[Versioned[Any] | None]:
        """`get` of several keys, those not yet seen read in one round trip (a read-only txn)."""
        missing = [full for full in dict.fromkeys(self._ks.key(key) for key, _ in wanted)
                   if full not in self._cache and full not in self._writes]
        if len(missing) > 1:
            request = rpc.TxnRequest()
            for full in missing:
                read = request.success.add().request_range
                read.key = full
                read.revision = self._revision
            response, _ = await kv.txn_request(self._conn, request)
            if not self._revision:
                self._revision = response.header.revision
            for index, full in enumerate(missing):
                self._cache[full] = kv.failure_kv(response, index)
        return [await self.get(key, kind) for key, kind in wanted]

    async def _fetch(self, full: bytes) -> Any:
        request = rpc.RangeRequest(key=full, revision=self._revision)
        response = await kv.range_request(self._conn, request)
        if not self._revision:
            # Pin the rest of this run's reads to the same snapshot.
            self._revision = response.header.revision
        found = response.kvs[0] if response.kvs else None
        self._cache[full] = found
        return found

    def assume(self, key: str, msg: Message | None, mod_revision: int) -> None:
        """Take `msg` at `mod_revision` (None, 0: absent) as `key`'s value without reading it.

        For values a watch cache already holds: a later `get` returns it and the
        commit compares `mod_revision` as for a read, so a stale assumption costs
        a rerun on the fresh values, which then win over the assumption. Saves
        the read's round trip on hot paths. A run that writes nothing but read an
        assumed key still sends its compares, so what it decided from a stale
        assumption is decided again too. (create_revision is not known: `get`
        reports the mod_revision in its place.)
        """
        full = self._ks.key(key)
        if full in self._cache or full in self._writes:
            return
        self._assumed.add(full)
        self._cache[full] = None if msg is None or not mod_revision else _Known(
            kv.encode(msg, key), mod_revision, mod_revision)

    def put(self, key: str, msg: Message, *, lease: Lease | None = None) -> None:
        """Write `msg` at `key` on commit (attached to `lease`, if given)."""
        full = self._ks.key(key)
        self._writes[full] = _Write("put", key, kv.encode(msg, key), lease.id if lease else 0)

    def create(self, key: str, msg: Message) -> None:
        """Create `key` on commit; the whole call raises AlreadyExists if it exists then."""
        full = self._ks.key(key)
        self._writes[full] = _Write("create", key, kv.encode(msg, key))

    def delete(self, key: str) -> None:
        """Delete `key` on commit (no error if it is already gone)."""
        full = self._ks.key(key)
        self._writes[full] = _Write("delete", key)

    def lease_ids(self) -> set[int]:
        """Leases the buffered writes attach keys to."""
        return {write.lease for write in self._writes.values() if write.lease}

    def _add_compares(self, request: Any) -> None:
        compares = {full: rev for full, rev in self._reads.items()}
        for full, write in self._writes.items():
            if write.kind == "create":
                if compares.get(full, 0) != 0:
                    raise errors.AlreadyExists(f"{write.key} already exists",
                                               metadata={"key": write.key})
                compares[full] = 0
        for full, rev in compares.items():
            kv.add_compare_mod(request, full, rev)

    def _add_writes(self, ops: Any) -> None:
        for full, write in self._writes.items():
            if write.kind == "delete":
                kv.add_delete(ops, full)
                continue
            seen = self._cache.get(full)
            # A put without a lease keeps the lease of a key we saw leased (a node record
            # updated by the scheduler must not outlive its agent).
            keep = write.kind == "put" and not write.lease and seen is not None \
                and bool(seen.lease) and self._reads.get(full, 0) != 0
            kv.add_put(ops, full, write.data, lease=write.lease, keep_lease=keep)

    async def commit(self) -> _Snapshot | None:
        """Commit; None on success, else the fresh values to run the body on again."""
        if not self._writes and not self._assumed.intersection(self._reads):
            return None
        request = rpc.TxnRequest()
        self._add_compares(request)
        self._add_writes(request.success)
        involved = list(dict.fromkeys([*self._reads, *self._writes]))
        for full in involved:
            kv.add_read(request.failure, full)
        response, maybe_applied = await kv.txn_request(self._conn, request)
        if response.succeeded:
            if self._writes:
                self.committed_revision = int(response.header.revision)
            return None
        fresh = {full: kv.failure_kv(response, i) for i, full in enumerate(involved)}
        if maybe_applied and self._writes and await self._applied(fresh):
            return None
        for full, write in self._writes.items():
            if write.kind == "create" and fresh[full] is not None:
                raise errors.AlreadyExists(f"{write.key} already exists",
                                           metadata={"key": write.key})
        return _Snapshot(fresh, response.header.revision)

    async def _applied(self, fresh: dict[bytes, Any]) -> bool:
        """True if an earlier, ambiguously failed try of this commit did land.

        For every write, the first change of its key after the revision this run
        read must be that write, and all of them must share one revision.
        """
        landed: set[int] = set()
        for full, write in self._writes.items():
            now, after = fresh[full], self._reads.get(full, 0) or self._revision
            if write.kind == "delete" and now is None and not self._reads.get(full):
                continue  # deleting a key that was already absent changes nothing
            if now is None and write.kind != "delete":
                return False
            if now is not None and now.mod_revision <= after:
                return False  # nothing was written there since we read it
            event = await history.first_change(self._conn, full, after) if after else None
            if event is None:
                # No history to consult: fall back to what the key holds now.
                if (now is None) != (write.kind == "delete") or (
                    now is not None and now.value != write.data
                ):
                    return False
                continue
            wanted = rpc.Event.DELETE if write.kind == "delete" else rpc.Event.PUT
            if event.type != wanted or (wanted == rpc.Event.PUT and event.kv.value != write.data):
                return False
            landed.add(event.kv.mod_revision)
        return len(landed) <= 1


async def atomic(
    conn: client.Connection,
    ks: keys.Keyspace,
    body: Callable[[Txn], Awaitable[T]],
    retries: int,
    on_lease_lost: Callable[[set[int]], bool] | None = None,
    deadline: float | None = None,
) -> T:
    """Run `body` and commit its writes atomically; run it again on conflicts.

    A commit refused because a lease is gone is run again when `on_lease_lost`,
    told the leases the writes used, says it forgot one of them (a shared
    lease the body asks for again gets granted anew); otherwise it raises.

    Conflicts are run again `retries` times, or with a `deadline` (the event
    loop's clock) until it passes however many runs that takes: under heavy
    contention on one key a writer can lose many rounds in a row, and a
    count would fail it while a rerun would still succeed.
    """
    seed = _Snapshot({}, 0)
    clock = asyncio.get_running_loop()
    attempt = -1
    while True:
        attempt += 1
        txn = Txn(conn, ks, seed)
        try:
            result = await body(txn)
        except errors.FailedPrecondition as exc:
            if exc.reason != "nubis.store.compacted" or attempt >= retries:
                raise
            seed = _Snapshot({}, 0)  # the pinned snapshot is gone: start over from now
            continue
        try:
            seed_or_done = await txn.commit()
        except errors.NotFound as exc:
            if exc.reason != LEASE_NOT_FOUND or attempt >= retries or on_lease_lost is None \
                    or not on_lease_lost(txn.lease_ids()):
                raise
            seed = _Snapshot({}, 0)
            continue
        if seed_or_done is None:
            return result
        seed = seed_or_done
        if (attempt >= retries) if deadline is None else (clock.time() >= deadline):
            raise errors.Conflict(
                f"transaction kept conflicting: gave up after {attempt + 1} attempts")
        await kv.conflict_pause(attempt)
