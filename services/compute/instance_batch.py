"""Instance creates of one project share transactions: one etcd commit for many creates.

Every create reserves the project's quota (instances, vcpus, ram_mb) in the
transaction that writes the instance BUILDING, so the creates of a project all
change its usage record and cannot commit side by side: within a replica they
take the project's turn (`Runner.turn`) one transaction at a time. While one
transaction holds the turn, the creates that arrive meanwhile gather into the
next one. It reads every request_id record and the quota in one round trip,
then admits the creates one after the other as a lone create would
(`instance.create`): a replayed request_id is answered with its instance, the
quota is checked against what the creates before it took, and the instance,
its operation, action and request_id record are written; then it commits once.
A create whose own part fails (over quota, its request_id used for another
request, its earlier instance since deleted) gets its own error and leaves
nothing in the transaction; a request_id repeated within one transaction
finds the record the first one wrote there, so it makes one instance. What
fails the transaction itself (conflicts past the patience, etcd out of reach)
fails every create in it; replicas racing on the same project still compare
the usage record. Each build starts once the commit is in, in the context of
the RPC that asked for it (its request id in the build's logs and peer calls).
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field

from google.protobuf import message
from nubis.common.v1 import request_pb2
from nubis.compute.v1 import instance_requests_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, quota, requests
from services.common.context import Principal
from services.common.store import Txn
from services.compute import instance, operation

Instance = instance.Instance
CreateRequest = instance_requests_pb2.CreateInstanceRequest
# Most creates one transaction carries. etcd refuses a transaction with more than 128
# operations in a branch (--max-txn-ops); a create writes four keys (instance,
# operation, action, request_id record) and reads back those four when the commit
# fails, besides the project's three quota records. A transaction etcd refuses (too
# many operations, too large: user_data is up to 64 KiB) runs again halved.
MAX_BATCH = 16
# The errors of one create's own part: they leave nothing in the transaction.
_OWN = (errors.ResourceExhausted, errors.AlreadyExists, errors.NotFound)
# What the store says of a transaction etcd refused (too many operations, too large).
_REJECTED = "nubis.store.rejected"
_UNDECODABLE = "nubis.store.undecodable"

Admitted = tuple[Instance, operation.Operation | None]
Outcome = dict[int, Admitted | errors.NubisError]


@dataclass
class _Item:
    """One queued create."""

    principal: Principal
    request: CreateRequest
    record: Instance
    idempotency: requests.Idempotency | None
    deadline: float
    context: contextvars.Context
    done: asyncio.Future[Instance]


@dataclass
class Batcher:
    """One replica's queues of instance creates, per project."""

    runner: operation.Runner
    _queues: dict[str, list[_Item]] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def create(self, principal: Principal, request: CreateRequest,
                     record: Instance) -> Instance:
        """`instance.create` of `record` (admitted), committed with the project's other
        creates of the moment; `validate_only` checks alone and writes nothing."""
        if request.validate_only:
            return await instance.create(self.runner, principal, request, record)
        project_id = record.meta.project_id
        idempotency = requests.prepare(self.runner.store, project_id, instance.CREATE,
                                       request, request.request_id)
        loop = asyncio.get_running_loop()
        item = _Item(principal, request, record, idempotency,
                     loop.time() + instance.CREATE_PATIENCE, contextvars.copy_context(),
                     loop.create_future())
        self._queues.setdefault(project_id, []).append(item)
        running = self._tasks.get(project_id)
        if running is None or running.done():
            # A context of its own: the drain serves many RPCs, none of them in particular.
            self._tasks[project_id] = loop.create_task(
                self._drain(project_id), name=f"instance-creates-{project_id}",
                context=contextvars.Context())
        return await item.done

    async def _drain(self, project_id: str) -> None:
        # No await between the emptiness check and the return: a create queued later
        # finds this task done and starts another.
        try:
            while self._queues.get(project_id):
                async with self.runner.turn(project_id):
                    batch = self._take(project_id)
                    if batch:
                        await _commit(self.runner, project_id, batch)
        except BaseException as exc:
            _fail(self._queues.pop(project_id, []), exc)
            raise
        finally:
            if self._tasks.get(project_id) is asyncio.current_task():
                del self._tasks[project_id]

    def _take(self, project_id: str) -> list[_Item]:
        """The next transaction's creates: the oldest waiting, those given up on dropped
        (a cancelled create that never had its turn writes nothing)."""
        queue = self._queues.get(project_id, [])
        batch: list[_Item] = []
        while queue and len(batch) < MAX_BATCH:
            item = queue.pop(0)
            if not item.done.done():
                batch.append(item)
        if not queue:
            self._queues.pop(project_id, None)
        return batch


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if item.done.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            item.done.cancel()
        else:
            item.done.set_exception(exc)


async def _commit(runner: operation.Runner, project_id: str, batch: list[_Item]) -> None:
    """One transaction for `batch` (the project's turn is held); every item's future gets
    its instance or its own error, and every instance written starts its build."""
    outcome: Outcome = {}

    async def body(txn: Txn) -> None:
        outcome.clear()
        await _prefetch(txn, project_id, batch)
        for index, item in enumerate(batch):
            outcome[index] = await _admit(txn, runner, project_id, item)

    try:
        # No create waits for its commit past its own patience.
        await runner.store.atomic(body, deadline=min(item.deadline for item in batch))
    except errors.InvalidArgument as exc:
        if exc.reason != _REJECTED or len(batch) < 2:
            _fail(batch, exc)
            return
        half = len(batch) // 2
        await _commit(runner, project_id, batch[:half])
        await _commit(runner, project_id, batch[half:])
        return
    except BaseException as exc:
        _fail(batch, exc)
        if not isinstance(exc, Exception):
            raise
        return
    _resolve(runner, batch, outcome)


async def _prefetch(txn: Txn, project_id: str, batch: list[_Item]) -> None:
    """What the items read first, in one round trip: the quota records and every
    request_id record (each item's replay check then decodes its own)."""
    wanted: list[tuple[str, type[message.Message]]] = [
        (quota.quota_key(project_id), identity_pb2.Quota),
        (quota.DEFAULTS_KEY, identity_pb2.Quota),
        (quota.usage_key(project_id, "compute"), identity_pb2.Usage),
    ]
    wanted += [(item.idempotency.key, request_pb2.RequestRecord) for item in batch
               if item.idempotency is not None]
    try:
        await txn.get_many(wanted)
    except errors.FailedPrecondition as exc:
        # A record of another format: read already; its item's replay check refuses it.
        if exc.reason != _UNDECODABLE:
            raise


async def _admit(txn: Txn, runner: operation.Runner, project_id: str,
                 item: _Item) -> Admitted | errors.NubisError:
    """One item in `txn`: its earlier instance, or its quota and records, or its own error."""
    try:
        earlier = await instance.replayed_in(txn, item.idempotency)
        if earlier is not None:
            return earlier, None
        await quota.reserve(txn, project_id, instance.usage(item.record))
    except _OWN as exc:  # raised before this item wrote anything
        return exc
    started = await instance.start_in(txn, runner, item.principal, item.request, item.record,
                                      item.idempotency)
    return started.instance, started.op


def _resolve(runner: operation.Runner, batch: list[_Item], outcome: Outcome) -> None:
    for index, item in enumerate(batch):
        result = outcome.get(index)
        if result is None:  # the body ran every item; a guard, not a path
            result = errors.Conflict("instance create was not run; retry")
        if isinstance(result, errors.NubisError):
            if not item.done.done():
                item.done.set_exception(result)
            continue
        written, op = result
        if op is not None:  # committed: it builds even if its caller has gone
            item.context.run(runner.start, op)
        if not item.done.done():
            item.done.set_result(instance.shown(written, item.principal))
