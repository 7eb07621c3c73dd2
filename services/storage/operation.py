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
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import structlog
from google.protobuf.message import Message
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import operation_pb2

from services.client import peers
from services.common import errors, operation_leases, resources, tasks
from services.common.settings import StorageSettings
from services.common.store import Store, Txn
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


Owner = operation_leases.Owner


class Runner(operation_leases.LeasedRunner[Operation]):
    """This replica's operations: started here or adopted, each run as an asyncio task."""

    prefix = keys.OPERATIONS
    record_type = Operation

    def __init__(self, store: Store, sender: TaskSender, clients: peers.ServiceClients | None,
                 config: StorageSettings, *, replica: str = "") -> None:
        super().__init__(store, replica)
        self.sender = sender
        self.clients = clients
        self.config = config
        self._handlers: dict[int, Handler] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        self.nodes = pool.NodeList(clients) if clients is not None else None
        """The scheduler's nodes, shared by this replica's placements."""

    def lease_ttl(self) -> int:
        return self.config.operation_lease_ttl

    def scan_interval(self) -> float:
        return self.config.operation_scan_interval

    def describe(self, op: Operation) -> dict[str, object]:
        return {"operation_id": op.id, "kind": Kind.Name(op.kind), "resource_id": op.resource_id}

    def adopted(self, record: Operation) -> None:
        record.step = "adopted"

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

    async def new(self, kind: int, resource_id: str, project_id: str, node: str,
                  **fields: object) -> Operation:
        """A record for a new operation owned by this replica (written by the caller's txn)."""
        me = await self.owner()
        stamp = resources.now()
        return Operation(id=str(tasks.new_operation_id()), kind=kind,  # type: ignore[arg-type]
                         resource_id=resource_id, project_id=project_id, node=node,
                         step="recorded", replica=me.replica, lease_id=me.lease_id,
                         start_time=stamp, update_time=stamp, **fields)  # type: ignore[arg-type]

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

    async def finish(self, op: Operation, writes: Writes, *, quota: bool = True,
                     reads: Sequence[tuple[str, type[Message]]] = ()) -> bool:
        """Apply `writes` and drop the record in one transaction, if `op` is still ours.

        False (nothing written) when the record is gone or another replica took it over.
        `quota` says the writes change the project's usage (they take this
        replica's turn at it); a create's outcome does not. `reads` are keys the
        writes read, read with the record in one round trip.
        """
        async def body(txn: Txn) -> bool:
            found, *_ = await txn.get_many([(keys.operation(op.resource_id), Operation), *reads])
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


class _Superseded(errors.FailedPrecondition):
    """The operation's record is gone or names another operation: stop working on it."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(f"operation {operation_id} is no longer current",
                         reason="nubis.storage.operation_superseded")


def is_superseded(exc: BaseException) -> bool:
    return isinstance(exc, _Superseded)
