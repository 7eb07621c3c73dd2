"""A replica's hold on the operations it runs: one etcd lease, the tasks, the adoption scan.

Storage and compute keep a record per operation in flight (under their own
`operations/` prefix) naming the replica running it and that replica's etcd
lease. `LeasedRunner` is the part both runners share: it grants the lease and
keeps it alive, runs each operation as an asyncio task (once per id), and
every scan interval takes over records whose lease etcd no longer holds (the
replica died, or was cut off longer than the lease) with a compare on the
record's revision, so exactly one replica adopts each. It also runs this
replica's own records that nothing runs: a request cancelled between the
commit of its record and the start of its task.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import structlog
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from services.common import errors, resources
from services.common.store import Lease, Store

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Owner:
    """Who runs an operation: a replica id and the lease that proves it is alive."""

    replica: str
    lease_id: int


class _Record(Protocol):
    """The fields every operation record has (storage's and compute's `Operation`)."""

    id: str
    replica: str
    lease_id: int
    adoptions: int

    @property
    def update_time(self) -> timestamp_pb2.Timestamp: ...


def _fields(op: Message) -> _Record:
    return cast(_Record, op)


class LeasedRunner(Generic[M]):
    """The lease, the running tasks and the adoption scan of one replica's operations."""

    prefix: str
    """Key prefix of the operation records (``storage/operations/``)."""
    record_type: type[M]
    """Message of the records."""

    def __init__(self, store: Store, replica: str = "") -> None:
        self.store = store
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._running: dict[str, asyncio.Task[None]] = {}

    # --- what a runner says about itself ---

    def lease_ttl(self) -> int:
        """Seconds the lease outlives a replica that stopped refreshing it."""
        raise NotImplementedError

    def scan_interval(self) -> float:
        """Seconds between two looks for orphans."""
        raise NotImplementedError

    def describe(self, op: M) -> dict[str, Any]:
        """Fields that name `op` in log lines."""
        return {"operation_id": _fields(op).id}

    def adopted(self, record: M) -> None:
        """Adjust a record this replica is taking over (before it is written)."""

    async def _run(self, op: M) -> None:
        raise NotImplementedError

    # --- shared ---

    @property
    def running(self) -> int:
        """Operations this replica is running now."""
        return len(self._running)

    async def owner(self) -> Owner:
        """This replica as an operation's owner (granting its lease on first use)."""
        async with self._lease_lock:
            if self._lease is None:
                self._lease = await self.store.grant_lease(self.lease_ttl())
            return Owner(self.replica, self._lease.id)

    def start(self, op: M) -> None:
        """Run `op` in the background (after its record committed); once per id."""
        op_id = _fields(op).id
        if op_id in self._running:
            return
        task = asyncio.get_running_loop().create_task(self._run(op), name=f"operation-{op_id}")
        self._running[op_id] = task
        task.add_done_callback(lambda _: self._running.pop(op_id, None))

    async def run_forever(self) -> None:
        """Keep the lease alive and adopt orphans every scan interval (a supervised loop)."""
        loop = asyncio.get_running_loop()
        me = await self.owner()
        last_scan = -float("inf")
        while True:
            try:
                assert self._lease is not None
                await self.store.refresh_lease(self._lease)
            except errors.NotFound:
                async with self._lease_lock:
                    self._lease = await self.store.grant_lease(self.lease_ttl())
                me = Owner(self.replica, self._lease.id)
                log.warning("operation lease was lost; granted a new one", replica=self.replica)
            if loop.time() - last_scan >= self.scan_interval():
                await self.adopt_orphans(me)
                last_scan = loop.time()
            await asyncio.sleep(min(self.lease_ttl() / 3, self.scan_interval()))

    async def adopt_orphans(self, me: Owner | None = None) -> int:
        """Take over every operation whose replica's lease is gone; returns how many."""
        me = me or await self.owner()
        records, _ = await self.store.list_all(self.prefix, self.record_type)
        if not records:
            return 0
        alive = set(await self.store.leases())
        adopted = 0
        for item in records:
            op = _fields(item.value)
            if op.lease_id == me.lease_id and op.replica == me.replica:
                self._restart_stranded(item.value)
                continue
            if op.lease_id in alive and op.lease_id != 0:
                continue
            taken = await self._adopt(item.key, item.mod_revision, item.value, me)
            if taken is not None and _fields(taken).id not in self._running:
                adopted += 1
                log.info("operation adopted", from_replica=op.replica,
                         **self.describe(item.value))
                self.start(taken)
        return adopted

    def _restart_stranded(self, op: M) -> None:
        """Run an operation of this replica that nothing runs: its request was cancelled
        between the commit of its record and the start (a caller that went away).

        Only a record older than one scan qualifies, so one just committed is
        left to the request that is about to start it.
        """
        fields = _fields(op)
        if fields.id in self._running:
            return
        age = (resources.now().ToNanoseconds() - fields.update_time.ToNanoseconds()) / 1e9
        if age < self.scan_interval():
            return
        log.warning("operation stranded by a cancelled request; running it", **self.describe(op))
        self.start(op)

    async def _adopt(self, key: str, revision: int, op: M, me: Owner) -> M | None:
        record = self.record_type()
        record.CopyFrom(op)
        fields = _fields(record)
        if fields.replica != me.replica:
            fields.adoptions += 1
        fields.replica, fields.lease_id = me.replica, me.lease_id
        fields.update_time.CopyFrom(resources.now())
        self.adopted(record)
        try:
            await self.store.replace(key, record, expect_revision=revision)
        except (errors.Conflict, errors.NotFound):
            return None  # another replica adopted it first, or it just finished
        return record

    async def stop(self) -> None:
        """Cancel what runs here; the records stay for the next owner.

        The lease is revoked, so another replica adopts them at its next scan
        instead of after the lease's ttl (a killed replica's lease just lapses).
        """
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)
        if self._lease is not None:
            try:
                await self.store.revoke_lease(self._lease)
            except errors.NubisError as exc:  # etcd out of reach: the ttl ends it
                log.warning("could not revoke the operation lease", error=exc.message)
            self._lease = None
