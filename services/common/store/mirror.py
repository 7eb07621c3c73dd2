"""A prefix's values held in memory, read again by what changed since the last read.

`Mirror.read` answers every value under its prefix at a revision no older
than the store's when it was called, as `Store.list_all` does, at the cost of
the changes since the mirror's last read: one round trip reads the keys
written after that revision (`min_mod_revision`) and counts the keys, and
only when the count says some went is a keys-only listing read to drop them.
A key that is in the mirror and not written since is current: a later write
would have moved its mod_revision past the last read, and a key deleted and
made again is a write too.

Reads that start while one is under way all share the next one (which starts
after each of them was called, so each sees every write committed before
it). What `read` answers is shared between callers: they must not change it.
"""

from __future__ import annotations

import asyncio
from typing import Generic

from aetcd import rpc

from services.common import errors
from services.common.store import client, keys, kv
from services.common.store.types import M, Versioned
from services.common.store.watch import COMPACTED


class Mirror(Generic[M]):
    """The values under `prefix`, kept by this process for the reads of hot paths."""

    def __init__(self, conn: client.Connection, ks: keys.Keyspace, prefix: str,
                 msg_type: type[M]) -> None:
        self._conn = conn
        self._ks = ks
        self._prefix = prefix
        self.msg_type = msg_type
        self._items: dict[str, Versioned[M]] = {}
        self._revision = 0
        self._answer: tuple[list[Versioned[M]], int] = ([], 0)
        self._lock = asyncio.Lock()
        self._next: asyncio.Future[tuple[list[Versioned[M]], int]] | None = None

    async def read(self) -> tuple[list[Versioned[M]], int]:
        """Every value under the prefix, in key order, and the revision it was read at."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._run(self._next))
        return await asyncio.shield(self._next)

    async def _run(self, done: asyncio.Future[tuple[list[Versioned[M]], int]]) -> None:
        async with self._lock:
            if self._next is done:
                self._next = None  # who calls from now on waits for a read after this one
            try:
                answer = await self._read()
            except asyncio.CancelledError:
                done.cancel()
                raise
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if not done.done():
                done.set_result(answer)

    async def _read(self) -> tuple[list[Versioned[M]], int]:
        start = self._ks.prefix(self._prefix)
        end = keys.range_end(start)
        if not self._revision:
            return await self._full()
        request = rpc.TxnRequest()
        changed = request.success.add().request_range
        changed.key, changed.range_end = start, end
        changed.min_mod_revision = self._revision + 1
        changed.limit = kv.MAX_PAGE_SIZE
        counted = request.success.add().request_range
        counted.key, counted.range_end, counted.count_only = start, end, True
        response, _ = await kv.txn_request(self._conn, request)
        revision = int(response.header.revision)
        written = response.responses[0].response_range
        if written.more:  # too much changed: read it all again
            return await self._full()
        items = dict(self._items)
        for item in written.kvs:
            relative = self._ks.relative(item.key)
            items[relative] = Versioned(relative, kv.decode(self.msg_type, item.value, relative),
                                        item.mod_revision, item.create_revision)
        if int(response.responses[1].response_range.count) != len(items):
            try:
                items = await self._without_deleted(items, revision)
            except errors.FailedPrecondition as exc:
                if exc.reason != COMPACTED:
                    raise
                return await self._full()
        if not written.kvs and len(items) == len(self._items) and revision >= self._revision:
            self._revision = revision
            self._answer = (self._answer[0], revision)
            return self._answer
        return self._keep(list(items.values()), revision)

    async def _full(self) -> tuple[list[Versioned[M]], int]:
        """Every value listed again (the first read, or one after too many changes)."""
        return self._keep(*await kv.list_all(self._conn, self._ks, self._prefix,
                                             self.msg_type))

    async def _without_deleted(self, items: dict[str, Versioned[M]],
                               revision: int) -> dict[str, Versioned[M]]:
        """`items` less the keys the prefix no longer holds at `revision`."""
        start = self._ks.prefix(self._prefix)
        held: set[str] = set()
        first = start
        while True:
            response = await kv.range_request(self._conn, rpc.RangeRequest(
                key=first, range_end=keys.range_end(start), keys_only=True,
                limit=kv.MAX_PAGE_SIZE, revision=revision))
            held.update(self._ks.relative(item.key) for item in response.kvs)
            if not response.more:
                return {key: item for key, item in items.items() if key in held}
            first = response.kvs[-1].key + b"\x00"

    def _keep(self, items: list[Versioned[M]], revision: int) -> tuple[list[Versioned[M]], int]:
        if revision < self._revision:  # an older read than the one kept: keep the newer
            return self._answer
        ordered = sorted(items, key=lambda item: item.key)
        self._items = {item.key: item for item in ordered}
        self._revision = revision
        self._answer = (ordered, revision)
        return self._answer
