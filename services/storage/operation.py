"""Asynchronous operations: recorded with their resource, run by one replica, adopted when it dies.

An operation record (``storage/operations/<resource id>``) is written in the
same transaction that moves a volume or snapshot into a transient state
(CREATING, DELETING, EXTENDING) and removed in the one that records the
outcome. It names the replica running it and that replica's etcd lease. Each
replica's `Runner` keeps its lease alive and, every `scan_interval`, looks
for records whose lease etcd no longer holds: their replica died (or was
cut off from etcd longer than the lease). It takes such a record over with a
compare on the record's revision, so exactly one replica adopts it, and runs
it again from the start: every agent task is idempotent and carries the
operation id, so sending it again either finds the work done or does it.

An outcome travels back as: agent → Celery result in Redis → `TaskSender`
(the awaiting replica) → `Runner.finish`, which writes the resource's new
state and deletes the record in one transaction, only if the record still
names this replica (an adopter that took over meanwhile records it instead).
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import operation_pb2

from services.client import peers
from services.common import errors, resources, tasks
from services.common.settings import StorageSettings
from services.common.store import Lease, Store, Txn
from services.common.task_sender import TaskSender
from services.storage import keys, pool

log = structlog.get_logger(__name__)

Operation = operation_pb2.Operation
Kind = operation_pb2.Operation.Kind
NODE_UNAVAILABLE = "nubis.storage.node_unavailable"
# Seconds a transaction of a request may keep losing compares before it gives
# up: every create, delete and outcome of one project writes its usage record,
# so many at once conflict for a while, and a count of reruns would fail some.
REQUEST_PATIENCE = 8.0
OUTCOME_PATIENCE = 60.0
FAILED = "nubis.storage.operation_failed"


class Handler(Protocol):
    """What one kind of operation does: run it to its outcome, or record that it failed."""

    async def run(self, runner: Runner, op: Operation) -> None:
        """Send the agent tasks and record the outcome with `runner.finish`."""

    async def fail(self, runner: Runner, op: Operation, fault: resource_pb2.Fault) -> None:
        """Record that the operation cannot finish (resource to ERROR with `fault`)."""


Writes = Callable[[Txn], Awaitable[None]]


def patience(seconds: float = REQUEST_PATIENCE) -> float:
    """The `deadline` (event loop time) of a `Store.atomic` that may rerun this long."""
    return asyncio.get_running_loop().time() + seconds


def fault(reason: str, message: str) -> resource_pb2.Fault:
    return resource_pb2.Fault(reason=reason, message=message, time=resources.now())


def fault_of(exc: errors.NubisError) -> resource_pb2.Fault:
    return fault(exc.reason, exc.message)


@dataclass(frozen=True)
class Owner:
    """Who runs an operation: a replica id and the lease that proves it is alive."""

    replica: str
    lease_id: int


class Runner:
    """This replica's operations: started here or adopted, each run as an asyncio task."""

    def __init__(self, store: Store, sender: TaskSender, clients: peers.ServiceClients | None,
                 config: StorageSettings, *, replica: str = "") -> None:
        self.store = store
        self.sender = sender
        self.clients = clients
        self.config = config
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lease: Lease | None = None
        self._lease_lock = asyncio.Lock()
        self._handlers: dict[int, Handler] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        self.nodes = pool.NodeList(clients) if clients is not None else None
        """The scheduler's nodes, shared by this replica's placements."""

    def register(self, kind: int, handler: Handler) -> None:
        self._handlers[kind] = handler

    def turn(self, project_id: str) -> asyncio.Lock:
        """This replica's turn at writing one project's usage record.

        Creates, deletes and outcomes of one project all write its quota usage;
        taking turns here, they commit one after the other instead of losing
        compares to each other (replicas still compare against each other).
        """
        lock = self._turns.get(project_id)
        if lock is None:
            lock = self._turns[project_id] = asyncio.Lock()
        return lock

    @property
    def running(self) -> int:
        """Operations this replica is running now."""
        return len(self._running)

    async def owner(self) -> Owner:
        """This replica as an operation's owner (granting its lease on first use)."""
        async with self._lease_lock:
            if self._lease is None:
                self._lease = await self.store.grant_lease(self.config.operation_lease_ttl)
            return Owner(self.replica, self._lease.id)

    async def new(self, kind: int, resource_id: str, project_id: str, node: str,
                  **fields: object) -> Operation:
        """A record for a new operation owned by this replica (written by the caller's txn)."""
        me = await self.owner()
        stamp = resources.now()
        return Operation(id=str(tasks.new_operation_id()), kind=kind,  # type: ignore[arg-type]
                         resource_id=resource_id, project_id=project_id, node=node,
                         step="recorded", replica=me.replica, lease_id=me.lease_id,
                         start_time=stamp, update_time=stamp, **fields)  # type: ignore[arg-type]

    def start(self, op: Operation) -> None:
        """Run `op` in the background (after its record committed)."""
        if op.id in self._running:
            return
        task = asyncio.get_running_loop().create_task(self._run(op), name=f"operation-{op.id}")
        self._running[op.id] = task
        task.add_done_callback(lambda _: self._running.pop(op.id, None))

    async def _run(self, op: Operation) -> None:
        handler = self._handlers.get(op.kind)
        if handler is None:
            log.error("no handler for operation", operation_id=op.id, kind=op.kind)
            return
        log.info("operation started", operation_id=op.id, kind=Kind.Name(op.kind),
                 resource_id=op.resource_id, node=op.node)
        pause = 0.5
        while True:
            try:
                await handler.run(self, op)
                return
            except asyncio.CancelledError:
                raise
            except _Superseded:
                log.info("operation superseded; left to its new owner", operation_id=op.id)
                return
            except errors.Unavailable as exc:
                # etcd out of reach while recording: run it again (every step is
                # idempotent) once it answers; the record keeps it resumable meanwhile.
                log.warning("operation interrupted; running it again", operation_id=op.id,
                            error=exc.message, retry_in=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.config.operation_scan_interval)
            except Exception as exc:  # a bug must not leave the resource stuck forever
                log.error("operation crashed", operation_id=op.id, exc_info=exc)
                try:
                    await handler.fail(self, op, fault(FAILED, f"operation {op.id} failed"))
                except errors.NubisError:
                    log.warning("could not record the failure; it will be resumed",
                                operation_id=op.id)
                return

    async def send(self, op: Operation, spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
                   request: tasks.Req) -> tasks.Resp:
        """Send one agent task of `op`, again after an unanswered try, up to `max_unanswered`.

        Each unanswered try is counted in the record (a resumed operation
        keeps its count); the last one raises Unavailable with reason
        `NODE_UNAVAILABLE`.
        """
        while True:
            try:
                return await self.sender.send(op.node, spec, request,
                                              operation_id=tasks.OperationId(op.id))
            except errors.Unavailable as exc:
                if exc.reason == "nubis.unavailable" and "node" not in exc.metadata:
                    raise
                count = await self._count_unanswered(op)
                if count >= self.config.operation_max_unanswered:
                    raise errors.Unavailable(
                        f"node {op.node} did not answer {spec.name} {count} times",
                        reason=NODE_UNAVAILABLE, metadata={"node": op.node}) from exc
                log.warning("agent did not answer; sending again", operation_id=op.id,
                            node=op.node, task=spec.name, unanswered=count)

    async def _count_unanswered(self, op: Operation) -> int:
        async def body(txn: Txn) -> int:
            found = await txn.get(keys.operation(op.resource_id), Operation)
            if found is None or found.value.id != op.id:
                raise _Superseded(op.id)
            record = found.value
            record.unanswered += 1
            record.update_time.CopyFrom(resources.now())
            txn.put(keys.operation(op.resource_id), record)
            return record.unanswered

        return await self.store.atomic(body, deadline=patience(OUTCOME_PATIENCE))

    async def finish(self, op: Operation, writes: Writes, *, quota: bool = True) -> bool:
        """Apply `writes` and drop the record in one transaction, if `op` is still ours.

        False (nothing written) when the record is gone or another replica took it over.
        `quota` says the writes change the project's usage (they take this
        replica's turn at it); a create's outcome does not.
        """
        async def body(txn: Txn) -> bool:
            found = await txn.get(keys.operation(op.resource_id), Operation)
            if found is None or found.value.id != op.id or found.value.replica != self.replica:
                return False
            await writes(txn)
            txn.delete(keys.operation(op.resource_id))
            return True

        if quota:  # the writes change the project's usage: take this replica's turn
            async with self.turn(op.project_id):
                done = await self.store.atomic(body, deadline=patience(OUTCOME_PATIENCE))
        else:
            done = await self.store.atomic(body, deadline=patience(OUTCOME_PATIENCE))
        if done:
            log.info("operation finished", operation_id=op.id, kind=Kind.Name(op.kind),
                     resource_id=op.resource_id)
        else:
            log.info("operation taken over elsewhere; outcome left to it", operation_id=op.id)
        return done

    async def run_forever(self) -> None:
        """Keep the lease alive and adopt orphans every `scan_interval` (a supervised loop)."""
        loop = asyncio.get_running_loop()
        me = await self.owner()
        last_scan = -float("inf")
        while True:
            try:
                assert self._lease is not None
                await self.store.refresh_lease(self._lease)
            except errors.NotFound:
                async with self._lease_lock:
                    self._lease = await self.store.grant_lease(self.config.operation_lease_ttl)
                me = Owner(self.replica, self._lease.id)
                log.warning("operation lease was lost; granted a new one", replica=self.replica)
            if loop.time() - last_scan >= self.config.operation_scan_interval:
                await self.adopt_orphans(me)
                last_scan = loop.time()
            await asyncio.sleep(min(self.config.operation_lease_ttl / 3,
                                    self.config.operation_scan_interval))

    async def adopt_orphans(self, me: Owner | None = None) -> int:
        """Take over every operation whose replica's lease is gone; returns how many."""
        me = me or await self.owner()
        records, _ = await self.store.list_all(keys.OPERATIONS, Operation)
        if not records:
            return 0
        alive = set(await self.store.leases())
        adopted = 0
        for item in records:
            op = item.value
            if op.lease_id == me.lease_id and op.replica == me.replica:
                self._restart_stranded(op)
                continue
            if op.lease_id in alive and op.lease_id != 0:
                continue
            taken = await self._adopt(item.key, item.mod_revision, op, me)
            if taken is not None and taken.id not in self._running:
                adopted += 1
                log.info("operation adopted", operation_id=op.id, kind=Kind.Name(op.kind),
                         resource_id=op.resource_id, from_replica=op.replica)
                self.start(taken)
        return adopted

    def _restart_stranded(self, op: Operation) -> None:
        """Run an operation of this replica that nothing runs: its request was cancelled
        between the commit of its record and the start (a caller that went away).

        Only a record older than one scan qualifies, so one just committed is
        left to the request that is about to start it.
        """
        if op.id in self._running:
            return
        age = resources.now().seconds - op.update_time.seconds
        if age < self.config.operation_scan_interval:
            return
        log.warning("operation stranded by a cancelled request; running it",
                    operation_id=op.id, kind=Kind.Name(op.kind), resource_id=op.resource_id)
        self.start(op)

    async def _adopt(self, key: str, revision: int, op: Operation,
                     me: Owner) -> Operation | None:
        record = Operation()
        record.CopyFrom(op)
        if op.replica != me.replica:
            record.adoptions += 1
        record.replica, record.lease_id = me.replica, me.lease_id
        record.step = "adopted"
        record.update_time.CopyFrom(resources.now())
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


class _Superseded(errors.FailedPrecondition):
    """The operation's record is gone or names another operation: stop working on it."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(f"operation {operation_id} is no longer current",
                         reason="nubis.storage.operation_superseded")


def is_superseded(exc: BaseException) -> bool:
    return isinstance(exc, _Superseded)
