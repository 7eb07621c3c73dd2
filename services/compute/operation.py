"""Instance operations: recorded with their instance, run by one replica, adopted when it dies.

An operation record (``compute/operations/<instance id>``) is written in the
same transaction that gives the instance its `task_id` and first task state,
and removed in the one that records the outcome (`Runner.finish`). It names
the replica running it and that replica's etcd lease. Every step a handler
takes is written into the record first (`Runner.step`: the step, the node,
the ports it made, the nodes that failed), so whoever runs it next goes on
from there. Each replica's `Runner` keeps its lease alive and, every
`operation_scan_interval`, takes over records whose lease etcd no longer
holds (a compare on the record's revision: exactly one replica adopts it) and
runs their handler again from the recorded step.

Every write of a running operation first checks that the record still is
this operation, run by this replica: a delete that took over a build, or an
adopter that took over a stalled replica, makes the old runner's next write
raise `Superseded`, and the old runner stops without writing anything.

An outcome travels back as: agent → Celery result in Redis → `TaskSender`
(the awaiting replica) → the handler → `Runner.finish`, which writes the
instance's new state, ends the action and deletes the record in one
transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from google.protobuf.message import Message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, operation_pb2

from services.client import peers
from services.common import errors, operation_leases, resources, tasks
from services.common.context import Principal
from services.common.settings import ComputeSettings
from services.common.store import Store, Txn, Versioned
from services.common.task_sender import TaskSender
from services.compute import action, instance, keys, liveness

log = structlog.get_logger(__name__)
T = TypeVar("T")

Operation = operation_pb2.Operation
Kind = operation_pb2.Operation.Kind
Instance = instance_pb2.Instance
TaskState = instance_pb2.Instance.TaskState
Fault = resource_pb2.Fault
Writes = Callable[[Txn], Awaitable[None]]
Mutate = Callable[[Instance], None]

BUSY = "nubis.instance.busy"
BAD_STATE = "nubis.instance.bad_state"
FAILED = "nubis.instance.operation_failed"
NODE_UNAVAILABLE = liveness.NODE_UNAVAILABLE
SUPERSEDED = "nubis.compute.operation_superseded"
# Seconds a transaction may keep losing compares before it gives up (many
# boots of one project all write its usage record).
PATIENCE = 30.0


class Handler(Protocol):
    """What one kind of operation does: run it to its outcome, or record that it failed."""

    async def run(self, runner: Runner, op: Operation) -> None:
        """Do the work from `op.step` on and record the outcome with `runner.finish`."""

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """Record that the operation cannot finish (release what it holds, keep `fault`)."""


def patience(seconds: float = PATIENCE) -> float:
    """The `deadline` (event loop time) of a `Store.atomic` that may rerun this long."""
    return asyncio.get_running_loop().time() + seconds


def fault(reason: str, message: str) -> Fault:
    return Fault(reason=reason, message=message, time=resources.now())


def bad_state(found: Instance, verb: str, needs: str) -> errors.FailedPrecondition:
    """The error of a verb asked of an instance in the wrong state."""
    state = Instance.State.Name(found.state)
    return errors.FailedPrecondition(
        f"instance is {state}; {verb} needs {needs}", reason=BAD_STATE,
        metadata={"id": found.meta.id, "state": state})


def busy(found: Instance) -> errors.FailedPrecondition:
    step = Instance.TaskState.Name(found.task_state)
    return errors.FailedPrecondition(
        f"instance {found.meta.id} is busy ({step}); try again when it is done",
        reason=BUSY, metadata={"id": found.meta.id, "task_state": step})


class _KindChanged(Exception):
    """The record of a running operation asks for another kind now."""


class Superseded(errors.FailedPrecondition):
    """The operation's record is gone or names another operation or replica: stop."""

    def __init__(self, operation_id: str) -> None:
        super().__init__(f"operation {operation_id} is no longer current", reason=SUPERSEDED)


class Handover(Exception):
    """The operation's record now asks for another kind (a delete took over a build).

    Raised by the running handler's next write; the runner goes on with the
    handler of `op.kind` (what the handler knew is merged into the record first).
    """

    def __init__(self, op: Operation) -> None:
        super().__init__(f"operation {op.id} is now {Kind.Name(op.kind)}")
        self.op = op


Owner = operation_leases.Owner
Wrote = dict[str, Message]
"""The records a transaction body of a running operation puts, by key, as written."""


def _note(wrote: Wrote, key: str, record: Message) -> None:
    """Note `record` as `key`'s value written (a copy: the caller may change it later)."""
    kept = type(record)()
    kept.CopyFrom(record)
    wrote[key] = kept


@dataclass(frozen=True)
class Started:
    """What `Runner.record` wrote in a caller's transaction: start it after the commit."""

    op: Operation
    instance: Instance


class Runner(operation_leases.LeasedRunner[Operation]):
    """This replica's instance operations: started here or adopted, each an asyncio task."""

    prefix = keys.OPERATIONS
    record_type = Operation

    def __init__(self, store: Store, sender: TaskSender, clients: peers.ServiceClients,
                 settings: ComputeSettings, *, replica: str = "") -> None:
        super().__init__(store, replica)
        self.sender = sender
        self.clients = clients
        self.settings = settings
        self._handlers: dict[int, Handler] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        self.liveness = liveness.NodeLiveness(clients, settings.node_check_interval)
        self._written: dict[str, dict[str, tuple[Message, int]]] = {}
        """Per running operation: the records its last write committed, each with the
        revision it was written at. Its next write compares them there (`Txn.assume`)
        instead of reading them again; a record changed meanwhile makes that commit run
        again on the fresh values, as after a read."""

    def lease_ttl(self) -> int:
        return self.settings.operation_lease_ttl

    def scan_interval(self) -> float:
        return self.settings.operation_scan_interval

    def describe(self, op: Operation) -> dict[str, object]:
        return {"operation_id": op.id, "kind": Kind.Name(op.kind), "instance_id": op.instance_id,
                "step": TaskState.Name(op.step)}

    def register(self, kind: int, handler: Handler) -> None:
        self._handlers[kind] = handler

    def turn(self, project_id: str) -> asyncio.Lock:
        """This replica's turn at writing one project's usage record (see storage's Runner)."""
        lock = self._turns.get(project_id)
        if lock is None:
            lock = self._turns[project_id] = asyncio.Lock()
        return lock

    # --- starting ---

    async def record(self, txn: Txn, found: Instance, kind: int, *, action_name: str,
                     principal: Principal | None, request_id: str = "",
                     params: Operation | None = None) -> Started:
        """Inside a caller's transaction: the operation record and its action for `found`.

        Sets `found.task_id` (the caller has already set its state and task
        state) and writes the instance, the operation and a RUNNING action.
        """
        me = await self.owner()
        stamp = resources.now()
        op = Operation()
        if params is not None:
            op.CopyFrom(params)
        op.id = str(tasks.new_operation_id())
        op.kind = kind  # type: ignore[assignment]
        op.instance_id, op.project_id = found.meta.id, found.meta.project_id
        op.node = op.node or found.node
        op.step = found.task_state
        op.replica, op.lease_id = me.replica, me.lease_id
        op.start_time.CopyFrom(stamp)
        op.update_time.CopyFrom(stamp)
        record = action.new(found, action_name, principal, request_id)
        op.action_id = record.meta.id
        found.task_id = op.id
        instance.put(txn, found)
        action.put(txn, record)
        txn.put(keys.operation(found.meta.id), op)
        return Started(op, found)

    async def begin(self, principal: Principal, instance_id: str, kind: int, *, action: str,
                    allowed: Mutate, mutate: Mutate, request_id: str = "",
                    params: Operation | None = None) -> Instance:
        """Start an operation on an idle instance: one transaction, then the handler runs.

        `allowed(instance)` raises (e.g. `bad_state`) when the verb does not
        apply; `mutate` sets the state and task state it moves to.
        """
        await instance.visible(self.store, principal, instance_id)

        async def body(txn: Txn) -> Started:
            found = (await instance.in_txn(txn, instance_id)).value
            if found.task_id:
                raise busy(found)
            allowed(found)
            mutate(found)
            return await self.record(txn, found, kind, action_name=action,
                                     principal=principal, request_id=request_id,
                                     params=params)

        started = await self.store.atomic(body, deadline=patience())
        self.start(started.op)
        return started.instance

    async def _run(self, op: Operation) -> None:
        handler: Handler | None = self._handlers.get(op.kind)
        log.info("operation started", operation_id=op.id, kind=Kind.Name(op.kind),
                 instance_id=op.instance_id, step=TaskState.Name(op.step))
        while handler is not None:
            try:
                await self._attempt(handler, op)
                return
            except Handover as handed:  # run on with the handler of its new kind
                op = handed.op
                handler = self._handlers.get(op.kind)
                log.info("operation handed over", operation_id=op.id, kind=Kind.Name(op.kind))
            except Superseded:
                log.info("operation superseded; left to its new owner", operation_id=op.id)
                return
        log.error("no handler for operation", operation_id=op.id, kind=op.kind)

    async def _attempt(self, handler: Handler, op: Operation) -> None:
        """Run `op` to its outcome (again while etcd or a peer is out of reach)."""
        pause = 0.5
        while True:
            try:
                await handler.run(self, op)
                return
            except (asyncio.CancelledError, Handover, Superseded):
                raise
            except errors.Unavailable as exc:
                # etcd or a peer out of reach: run it again from its recorded step.
                log.warning("operation interrupted; running it again", operation_id=op.id,
                            error=exc.message, retry_in=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.settings.operation_scan_interval)
            except Exception as exc:  # a bug must not leave the instance stuck forever
                log.error("operation crashed", operation_id=op.id, exc_info=exc)
                try:
                    await handler.fail(self, op, fault(FAILED, f"operation {op.id} failed: {exc}"))
                except (Handover, Superseded):
                    raise
                except errors.NubisError:
                    log.warning("could not record the failure; it will be resumed",
                                operation_id=op.id)
                return

    # --- steps ---

    async def _current(self, txn: Txn, op: Operation, *, with_action: bool = False) -> Instance:
        """Inside a transaction: the instance, if `op` is still its operation and ours.

        Superseded when the record is gone or another replica's; _KindChanged
        when it asks for another kind now (see `Handover`). `with_action`: the
        body writes the operation's action too, read in the same round trip.
        """
        # All read in one round trip (most runs find the operation still ours).
        wanted: list[tuple[str, type[Message]]] = [
            (keys.operation(op.instance_id), Operation), (keys.instance(op.instance_id), Instance)]
        if with_action and op.action_id:
            wanted.append((keys.action(op.instance_id, op.action_id), action.InstanceAction))
        found, record, *_ = await txn.get_many(wanted)
        if found is None or found.value.id != op.id or found.value.replica != self.replica:
            raise Superseded(op.id)
        if found.value.kind != op.kind:
            raise _KindChanged
        if record is None:
            raise Superseded(op.id)
        current: Instance = record.value
        return current

    async def instance_of(self, op: Operation) -> Instance:
        """The instance `op` runs on, read with the operation and its action in one round
        trip; the operation's next write compares the three as read here (`_written`)."""
        wanted: list[tuple[str, type[Message]]] = [
            (keys.operation(op.instance_id), Operation), (keys.instance(op.instance_id), Instance)]
        if op.action_id:
            wanted.append((keys.action(op.instance_id, op.action_id), action.InstanceAction))

        async def body(txn: Txn) -> list[Versioned[Any] | None]:
            return await txn.get_many(wanted)

        found = await self.store.atomic(body)  # reads only: no commit
        if found[1] is None:
            raise instance.not_found(op.instance_id)
        self._written[op.id] = {key: (read.value, read.mod_revision)
                                for (key, _), read in zip(wanted, found, strict=True)
                                if read is not None}
        record: Instance = found[1].value
        kept = Instance()
        kept.CopyFrom(record)  # the caller's to change; the kept one stays as read
        return kept

    async def _atomic(self, op: Operation, body: Callable[[Txn, Wrote], Awaitable[T]]) -> T:
        """`Store.atomic` of a running operation's write: a changed kind hands it over.

        `body` notes in its second argument the records it puts (key: the record as
        written), for the next write to compare instead of read (`_written`).
        """
        last: list[Txn] = []
        wrote: Wrote = {}

        async def run(txn: Txn) -> T:
            last[:] = [txn]
            wrote.clear()
            for key, (record, revision) in self._written.get(op.id, {}).items():
                txn.assume(key, record, revision)
            return await body(txn, wrote)

        try:
            result = await self.store.atomic(run, deadline=patience())
        except _KindChanged:
            self._written.pop(op.id, None)
            raise Handover(await self._merge(op)) from None
        except BaseException:
            self._written.pop(op.id, None)
            raise
        revision = last[0].committed_revision if last else 0
        if not revision:  # nothing written, or an earlier try landed it: read next time
            self._written.pop(op.id, None)
            return result
        known = self._written.setdefault(op.id, {})
        for key, record in wrote.items():
            known[key] = (record, revision)
        return result

    async def _merge(self, op: Operation) -> Operation:
        """What the handler of `op` knew (node, progress, failed nodes), kept in the record."""
        async def body(txn: Txn) -> Operation:
            found = await txn.get(keys.operation(op.instance_id), Operation)
            if found is None or found.value.id != op.id or found.value.replica != self.replica:
                raise Superseded(op.id)
            record = found.value
            record.node = record.node or op.node
            for key, value in op.progress.items():
                record.progress.setdefault(key, value)
            for node in op.failed_nodes:
                if node not in record.failed_nodes:
                    record.failed_nodes.append(node)
            txn.put(keys.operation(op.instance_id), record)
            return record

        return await self.store.atomic(body, deadline=patience())

    async def step(self, op: Operation, task_state: int, *, mutate: Mutate | None = None,
                   event: str = "", node: str | None = None) -> Instance:
        """Record reaching `task_state` (with `op`'s fields as they are now) and an event."""
        if node is not None:
            op.node = node
        op.step = task_state  # type: ignore[assignment]

        async def body(txn: Txn, wrote: Wrote) -> Instance:
            found = await self._current(txn, op, with_action=bool(event))
            found.task_state = task_state  # type: ignore[assignment]
            if mutate is not None:
                mutate(found)
            instance.put(txn, found)
            op.update_time.CopyFrom(resources.now())
            txn.put(keys.operation(op.instance_id), op)
            _note(wrote, keys.instance(op.instance_id), found)
            _note(wrote, keys.operation(op.instance_id), op)
            if event:
                written = await action.add_event(txn, op.instance_id, op.action_id, event,
                                                 op.node)
                if written is not None:
                    _note(wrote, keys.action(op.instance_id, op.action_id), written)
            return found

        return await self._atomic(op, body)

    async def save(self, op: Operation) -> None:
        """Record `op`'s fields (progress, ports, failed nodes) without a new step."""
        async def body(txn: Txn, wrote: Wrote) -> None:
            await self._current(txn, op)
            op.update_time.CopyFrom(resources.now())
            txn.put(keys.operation(op.instance_id), op)
            _note(wrote, keys.operation(op.instance_id), op)

        await self._atomic(op, body)

    async def send(self, op: Operation, spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
                   request: tasks.Req, *, node: str | None = None) -> tasks.Resp:
        """One agent task of `op` to `node` (default `op.node`), again after an unanswered try.

        Unanswered tries are counted in the record; the last one allowed
        raises Unavailable with reason `NODE_UNAVAILABLE`, as does the node
        going DOWN while it is awaited (`liveness`: no more tries then).
        """
        target = node or op.node
        while True:
            try:
                return await self.liveness.awaiting(target, spec.name, self.sender.send(
                    target, spec, request, operation_id=tasks.OperationId(op.id)))
            except errors.Unavailable as exc:
                if exc.reason == "nubis.unavailable" and "node" not in exc.metadata:
                    raise
                if "down" in exc.metadata:
                    raise
                op.unanswered += 1
                await self.save(op)
                if op.unanswered >= self.settings.operation_max_unanswered:
                    raise errors.Unavailable(
                        f"node {target} did not answer {spec.name} {op.unanswered} times",
                        reason=NODE_UNAVAILABLE, metadata={"node": target}) from exc
                log.warning("agent did not answer; sending again", operation_id=op.id,
                            node=target, task=spec.name, unanswered=op.unanswered)

    async def finish(self, op: Operation, mutate: Mutate, *, fault: Fault | None = None,
                     extra: Writes | None = None, quota: bool = False,
                     remove: bool = False) -> bool:
        """The outcome in one transaction: instance, action, `extra`, record dropped.

        False (nothing written) when the record is gone or another replica took
        it over. `quota` says `extra` writes the project's usage (this
        replica's turn at it is taken). `remove` deletes the instance's record
        instead of writing it (a delete's outcome: watchers see DELETED).
        """
        async def body(txn: Txn, wrote: Wrote) -> bool:
            try:
                found = await self._current(txn, op, with_action=True)
            except Superseded:
                return False
            mutate(found)
            found.task_state = TaskState.TASK_STATE_UNSPECIFIED
            found.task_id = ""
            if fault is not None:
                found.fault.CopyFrom(fault)
            if remove:
                txn.delete(keys.instance(op.instance_id))
            else:
                instance.put(txn, found)
            await action.finish(txn, op.instance_id, op.action_id, fault)
            if extra is not None:
                await extra(txn)
            txn.delete(keys.operation(op.instance_id))
            return True

        try:
            if quota:
                async with self.turn(op.project_id):
                    done = await self._atomic(op, body)
            else:
                done = await self._atomic(op, body)
        finally:
            self._written.pop(op.id, None)  # its record is gone: no write of it follows
        log.info("operation finished" if done else "operation taken over; outcome left to it",
                 operation_id=op.id, kind=Kind.Name(op.kind), instance_id=op.instance_id,
                 failed=fault is not None)
        return done

    async def hand_over(self, txn: Txn, instance_id: str, kind: int, *,
                        take: bool = False) -> Operation | None:
        """Inside a transaction: turn the operation in flight on `instance_id` into `kind`.

        Its runner goes on with `kind`'s handler at its next write (`Handover`),
        keeping the operation's id, node and progress; with `take` this
        replica owns it now (the caller starts it; the old runner is superseded).
        None when nothing is in flight.
        """
        found = await txn.get(keys.operation(instance_id), Operation)
        if found is None:
            return None
        record = found.value
        record.kind = kind  # type: ignore[assignment]
        record.update_time.CopyFrom(resources.now())
        if take:
            me = await self.owner()
            record.replica, record.lease_id = me.replica, me.lease_id
        txn.put(keys.operation(instance_id), record)
        return record
