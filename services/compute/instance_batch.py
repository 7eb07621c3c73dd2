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

Each create's transaction also reads its flavor, compared at the commit: a
flavor disabled, made private or deleted after the create was admitted (on
a flavor admission kept from a recent read) fails that create, with the
error a fresh admission would give. The replica remembers what its last
commit of a project read and wrote (the quota records, the flavors) and
takes them as read (`Txn.assume`), and takes every request_id record as
absent: in the steady state a transaction is its commit alone, one round
trip. A record that moved meanwhile (a delete released quota, an operator
changed a limit or a flavor, a retried request_id) fails the compare, and
the transaction runs again on the fresh values the failed commit returned.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass, field

from google.protobuf import message
from nubis.common.v1 import request_pb2
from nubis.compute.v1 import flavor_pb2, instance_requests_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, quota, requests
from services.common.context import Principal
from services.common.store import Txn
from services.compute import flavor, instance, keys, operation

Instance = instance.Instance
CreateRequest = instance_requests_pb2.CreateInstanceRequest
# Most creates one transaction carries. etcd refuses a transaction with more than 128
# operations in a branch (--max-txn-ops); a create writes four keys (instance,
# operation, action, request_id record) and reads back those four when the commit
# fails, besides the project's three quota records. A transaction etcd refuses (too
# many operations, too large: user_data is up to 64 KiB) runs again halved.
MAX_BATCH = 16


class _FlavorUnusable(errors.FailedPrecondition):
    """A create's flavor disabled since its admission: that create's own error."""


# The errors of one create's own part: they leave nothing in the transaction.
_OWN = (errors.ResourceExhausted, errors.AlreadyExists, errors.NotFound, _FlavorUnusable)
# What the store says of a transaction etcd refused (too many operations, too large).
_REJECTED = "nubis.store.rejected"
_UNDECODABLE = "nubis.store.undecodable"

Admitted = tuple[Instance, operation.Operation | None]
Outcome = dict[int, Admitted | errors.NubisError]
Known = dict[str, tuple[message.Message | None, int]]
"""Records as a commit left them: key → (value or None, mod_revision)."""
# Flavors a replica remembers from its commits; past this many it forgets them all.
_MAX_FLAVORS = 1024


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
    _known: dict[str, Known] = field(default_factory=dict)
    """Per project, its quota records as this replica's last commit of it left them."""
    _flavors: Known = field(default_factory=dict)
    """Flavor records as this replica's last commits read them."""

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
                        await self._commit(project_id, batch)
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

    async def _commit(self, project_id: str, batch: list[_Item]) -> None:
        """`_commit` of `batch`, on the records this replica knows; what it learns kept."""
        known = self._known.pop(project_id, {})
        for key in map(_flavor_key, batch):
            if key in self._flavors:
                known[key] = self._flavors[key]
        learned = await _commit(self.runner, project_id, batch, known)
        if len(self._flavors) > _MAX_FLAVORS:
            self._flavors.clear()
        for key, value in learned.items():
            if key.startswith(keys.FLAVORS):
                self._flavors[key] = value
            else:
                self._known.setdefault(project_id, {})[key] = value


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if item.done.done():
            continue
        if isinstance(exc, asyncio.CancelledError):
            item.done.cancel()
        else:
            item.done.set_exception(exc)


async def _commit(runner: operation.Runner, project_id: str, batch: list[_Item],
                  known: Known) -> Known:
    """One transaction for `batch` (the project's turn is held), taking `known` as read;
    every item's future gets its instance or its own error, and every instance written
    starts its build. Answers the quota and flavor records as the commit left them
    (nothing if it failed)."""
    outcome: Outcome = {}
    last: list[Txn] = []

    async def body(txn: Txn) -> None:
        outcome.clear()
        last[:] = [txn]
        for key, (value, revision) in known.items():
            txn.assume(key, value, revision)
        for item in batch:
            if item.idempotency is not None:
                txn.assume(item.idempotency.key, None, 0)
        await _prefetch(txn, project_id, batch)
        for index, item in enumerate(batch):
            outcome[index] = await _admit(txn, runner, project_id, item)

    try:
        # No create waits for its commit past its own patience.
        await runner.store.atomic(body, deadline=min(item.deadline for item in batch))
    except errors.InvalidArgument as exc:
        if exc.reason != _REJECTED or len(batch) < 2:
            _fail(batch, exc)
            return {}
        half = len(batch) // 2
        await _commit(runner, project_id, batch[:half], {})
        await _commit(runner, project_id, batch[half:], {})
        return {}
    except BaseException as exc:
        _fail(batch, exc)
        if not isinstance(exc, Exception):
            raise
        return {}
    _resolve(runner, batch, outcome)
    return await _left(last[0], project_id, batch)


async def _left(txn: Txn, project_id: str, batch: list[_Item]) -> Known:
    """The quota and flavor records as `txn`'s commit left them (read, or written)."""
    wanted: list[tuple[str, type[message.Message]]] = [
        *_quota_records(project_id),
        *((_flavor_key(item), flavor_pb2.Flavor) for item in batch)]
    left: Known = {}
    written = quota.usage_key(project_id, "compute")
    try:
        read = await txn.get_many(wanted)  # all read by the run already: no round trip
    except errors.NubisError:  # the next transaction reads them instead
        return left
    for (key, _), found in zip(wanted, read, strict=True):
        if key == written and txn.committed_revision:
            left[key] = (found.value if found else None, txn.committed_revision)
        else:
            left[key] = (found.value if found else None, found.mod_revision if found else 0)
    return left


def _flavor_key(item: _Item) -> str:
    return keys.flavor(item.record.flavor.flavor_id)


def _quota_records(project_id: str) -> list[tuple[str, type[message.Message]]]:
    return [(quota.quota_key(project_id), identity_pb2.Quota),
            (quota.DEFAULTS_KEY, identity_pb2.Quota),
            (quota.usage_key(project_id, "compute"), identity_pb2.Usage)]


async def _prefetch(txn: Txn, project_id: str, batch: list[_Item]) -> None:
    """What the items read first, in one round trip (none for what the transaction takes
    as known): the quota records, the flavors and every request_id record (each item's
    replay check then decodes its own)."""
    wanted = _quota_records(project_id)
    wanted += [(_flavor_key(item), flavor_pb2.Flavor) for item in batch]
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
        await _flavor_usable(txn, project_id, item.record.flavor.flavor_id)
        await quota.reserve(txn, project_id, instance.usage(item.record))
    except _OWN as exc:  # raised before this item wrote anything
        return exc
    started = await instance.start_in(txn, runner, item.principal, item.request, item.record,
                                      item.idempotency)
    return started.instance, started.op


async def _flavor_usable(txn: Txn, project_id: str, flavor_id: str) -> None:
    """The flavor as the transaction reads it still usable by the project: the errors of
    admission's check (FailedPrecondition raised as an item's own NotFound's sibling)."""
    found = await txn.get(keys.flavor(flavor_id), flavor_pb2.Flavor)
    try:
        flavor.check_usable(found.value if found else None, project_id, flavor_id)
    except errors.NotFound:
        raise errors.NotFound(f"instance.flavor_id: flavor {flavor_id} not found",
                              metadata={"field": "instance.flavor_id", "id": flavor_id}) from None
    except errors.FailedPrecondition as exc:
        raise _FlavorUnusable(f"instance.flavor_id: {exc.message}", reason=exc.reason,
                              metadata={**exc.metadata, "field": "instance.flavor_id"}) from None


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
