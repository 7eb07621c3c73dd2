"""Port creates of one project share transactions: one etcd commit for many ports.

Every port create of a project changes the project's quota usage record, so
concurrent creates in one project cannot commit side by side: each would
lose its compare on that record to the others. Within a replica they
therefore queue per project, and while one transaction commits, the creates
that arrive meanwhile gather into the next one: a single transaction reads
what all of them need (networks, groups, subnets, a MAC and an address guess
each) in a few round trips, holds every address and MAC (create-if-absent
keys, as for a single create), reserves the quota one port at a time and
commits once. A create whose own part fails (an address taken, a network not
found, the quota reached) gets its own error and leaves nothing in the
transaction; the others go on. Replicas racing on the same project still
compare the usage record, so no address, MAC or quota unit is ever given twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from google.protobuf import message
from nubis.common.v1 import request_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import ipam_pb2, network_pb2, port_pb2, security_group_pb2, subnet_pb2

from services.common import errors, quota, requests, resources
from services.common.context import Principal
from services.common.store import Txn
from services.network import binding, ipam, keys, port_addresses, security_group
from services.network import network as network_module
from services.network import port as port_module

Port = port_pb2.Port
# Most creates one transaction carries. etcd refuses a transaction with more than 128
# operations in a branch (--max-txn-ops); a port writes four keys, compares two or
# three and reads back about five when the commit fails, plus the addresses it tries
# on a nearly full subnet (a transaction refused for its size runs again halved). At 16
# the failure branch of a full batch was over the limit on a subnet 80% full (200 ports
# in a /24): one refused round trip for every full batch.
MAX_BATCH = 12


@dataclass
class _Item:
    """One queued create."""

    made: Port
    given: Port
    principal: Principal | None
    idempotency: requests.Idempotency | None
    done: asyncio.Future[tuple[str, int]]
    tried: list[tuple[str, int]] = field(default_factory=list)
    # Its first guesses, kept across reruns: a rerun then sees whether they were taken.
    guessed: port_addresses.Guesses | None = None


@dataclass
class Batcher:
    """One replica's queues of port creates, per project."""

    _queues: dict[str, list[_Item]] = field(default_factory=dict)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def create(self, creation: port_module.Creation,
                     request: port_pb2.CreatePortRequest) -> Port:
        """CreatePort: validated here, committed with whatever else the project creates now."""
        if request.validate_only:
            return await port_module.create(creation, request)
        given = request.port
        port_module.validate_new(given, creation.principal)
        project_id = creation.project_id
        groups = await port_module.groups_of(creation.store, creation.turns, project_id, given)
        idempotency = requests.prepare(creation.store, project_id, port_module.CREATE_METHOD,
                                       request, request.request_id)
        made = port_module.new_port(given, project_id, groups)
        item = _Item(made, given, creation.principal, idempotency,
                     asyncio.get_running_loop().create_future())
        self._queues.setdefault(project_id, []).append(item)
        running = self._tasks.get(project_id)
        if running is None or running.done():
            self._tasks[project_id] = asyncio.get_running_loop().create_task(
                self._drain(creation, project_id), name=f"port-creates-{project_id}")
        made_id, revision = await item.done
        if made_id != made.meta.id or not revision:
            return await port_module.fetch(creation.store, made_id)
        made.meta.revision = revision
        binding.remember_network(made.meta.id, made.network_id)
        return made

    async def _drain(self, creation: port_module.Creation, project_id: str) -> None:
        # No await between the emptiness check and the return: a create queued later
        # finds this task done and starts another.
        while self._queues.get(project_id):
            queue = self._queues[project_id]
            batch, queue[:] = queue[:MAX_BATCH], queue[MAX_BATCH:]
            if not queue:
                del self._queues[project_id]
            await _commit(creation, project_id, batch)
        if self._tasks.get(project_id) is asyncio.current_task():
            del self._tasks[project_id]

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


Outcome = dict[int, str | BaseException]
# What etcd says of a transaction over its --max-txn-ops.
_TOO_MANY = "too many operations"


def _fail(batch: list[_Item], exc: BaseException) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)
Live = list[tuple[int, "_Item", network_pb2.Network]]


async def _commit(creation: port_module.Creation, project_id: str, batch: list[_Item]) -> None:
    """One transaction for `batch`; every item's future gets its port or its own error."""
    outcome: Outcome = {}
    last: list[Txn] = []
    usage: list[identity_pb2.Usage] = []

    async def body(txn: Txn) -> None:
        last[:] = [txn]
        outcome.clear()
        usage.clear()
        await _hold_all(txn, creation, project_id, batch, outcome, usage)

    try:
        await creation.store.atomic(body, deadline=asyncio.get_running_loop().time()
                                    + port_module.COMMIT_PATIENCE)
    except errors.InvalidArgument as exc:
        await _too_many(creation, project_id, batch, exc)
        return
    except BaseException as exc:
        creation.turns.usage.pop(project_id, None)
        _fail(batch, exc)
        if not isinstance(exc, Exception):
            raise
        return
    finally:
        for item in batch:
            creation.turns.ipam_hints.done(item.tried)
    revision = last[0].committed_revision if last else 0
    _resolve(batch, outcome, revision)
    if usage and revision:
        creation.turns.usage[project_id] = (usage[-1], revision)


async def _hold_all(txn: Txn, creation: port_module.Creation, project_id: str,
                    batch: list[_Item], outcome: Outcome, usage: list[identity_pb2.Usage]
                    ) -> None:
    """The transaction's body: every item's records, addresses and quota, or its error."""
    await _prefetch(txn, creation, project_id, batch)
    live = await _checked(txn, project_id, batch, outcome)
    guessed = await _guess_all(txn, creation, live, outcome)
    for index, item, net in live:
        if index in guessed:
            outcome[index] = await _one(txn, creation, project_id, item, net, guessed[index],
                                        usage)


async def _too_many(creation: port_module.Creation, project_id: str, batch: list[_Item],
                    exc: errors.InvalidArgument) -> None:
    """A transaction etcd refused as too large runs again as two halves; other errors fail."""
    for item in batch:
        creation.turns.ipam_hints.done(item.tried)
        item.tried.clear()
    if len(batch) < 2 or _TOO_MANY not in exc.message:
        _fail(batch, exc)
        return
    # Ports on nearly full subnets read many addresses: halve the transaction.
    half = len(batch) // 2
    await _commit(creation, project_id, batch[:half])
    await _commit(creation, project_id, batch[half:])


async def _checked(txn: Txn, project_id: str, batch: list[_Item], outcome: Outcome) -> Live:
    """The items to create: replayed requests answered, unusable networks or groups refused."""
    live: Live = []
    for index, item in enumerate(batch):
        try:
            earlier = await requests.replayed(txn, item.idempotency)
            if earlier:
                outcome[index] = earlier
                continue
            net = await network_module.in_txn(txn, item.principal, item.made.network_id,
                                              field="port.network_id")
            if item.made.security_group_ids:
                await security_group.check_usable_in(
                    txn, project_id, list(item.made.security_group_ids),
                    field="port.security_group_ids")
            live.append((index, item, net))
        except errors.NubisError as exc:
            outcome[index] = exc
    return live


async def _guess_all(txn: Txn, creation: port_module.Creation, live: Live,
                     outcome: Outcome) -> dict[int, port_addresses.Guesses]:
    """Every item's subnets (known records), then its MAC and address guesses: taken as
    absent, or on a crowded subnet read, all in one round trip."""
    wanted = [(keys.subnet(sid), subnet_pb2.Subnet) for _, _, net in live
              for sid in net.subnet_ids]
    await creation.turns.records.read(txn, wanted)
    found = await txn.get_many(wanted)
    subnets = {item.value.meta.id: item.value for item in found if item is not None}
    rng = ipam.RNG
    guessed: dict[int, port_addresses.Guesses] = {}
    reads: port_addresses.Reads = []
    for index, item, net in live:
        mine = {sid: subnets[sid] for sid in net.subnet_ids if sid in subnets}
        try:
            if item.guessed is None:
                item.guessed = port_addresses.guesses(creation, item.given, mine, rng)
        except errors.NubisError as exc:
            outcome[index] = exc
            continue
        guessed[index] = item.guessed
        reads += item.guessed.blind(txn, item.given, creation.turns.ipam_hints, len(live))
    await txn.get_many(reads)
    return guessed


def _resolve(batch: list[_Item], outcome: Outcome, revision: int) -> None:
    for index, item in enumerate(batch):
        result = outcome.get(index)
        if isinstance(result, BaseException):
            item.done.set_exception(result)
        elif result is None:
            item.done.set_exception(errors.Conflict("port create was not run; retry"))
        else:
            item.done.set_result((result, revision if result == item.made.meta.id else 0))


async def _prefetch(txn: Txn, creation: port_module.Creation, project_id: str,
                    batch: list[_Item]) -> None:
    """Everything the items read first: the known records assumed, the rest in one round
    trip. The usage is read in that round trip too; only when there is nothing else to read
    is it taken as this replica's last commit left it (which saves the round trip, and costs
    a rerun when it is stale: while servers boot, compute writes the same usage record for
    every instance it creates, so a port create that assumed it lost its first commit)."""
    known: list[tuple[str, type[message.Message]]] = [
        (quota.quota_key(project_id), identity_pb2.Quota),
        (quota.DEFAULTS_KEY, identity_pb2.Quota),
    ]
    wanted: list[tuple[str, type[message.Message]]] = []
    for item in batch:
        if resources.is_uuid(item.made.network_id):
            known.append((keys.network(item.made.network_id), network_pb2.Network))
        known += [(keys.security_group(group), security_group_pb2.SecurityGroup)
                  for group in item.made.security_group_ids if resources.is_uuid(group)]
        if item.idempotency is not None:
            wanted.append((item.idempotency.key, request_pb2.RequestRecord))
    usage = creation.turns.usage.get(project_id)
    if usage is None or wanted:
        wanted.append((quota.usage_key(project_id, "network"), identity_pb2.Usage))
    else:
        txn.assume(quota.usage_key(project_id, "network"), usage[0], usage[1])
    await txn.get_many(wanted)
    await creation.turns.records.read(txn, known)


async def _one(txn: Txn, creation: port_module.Creation, project_id: str, item: _Item,
               net: network_pb2.Network, guessed: port_addresses.Guesses,
               usage: list[identity_pb2.Usage]) -> str | BaseException:
    """Hold one item's addresses, quota and records in `txn`; its error leaves nothing behind."""
    made = item.made
    made.mac_address = ""
    try:
        await port_addresses.hold_addresses(txn, creation, made, item.given,
                                            list(net.subnet_ids), item.tried, guessed)
        reserved = await quota.reserve(txn, project_id, {"ports": 1})
    except errors.NubisError as exc:
        # Its keys were absent when read: deleting them again writes nothing.
        if made.mac_address:
            txn.delete(keys.mac(made.mac_address))
        for fixed in made.fixed_ips:
            ipam.release(txn, fixed.subnet_id, fixed.ip_address)
        return exc
    usage.append(reserved)
    txn.create(keys.port(made.meta.id), made)
    txn.put(keys.network_port(made.network_id, made.meta.id),
            ipam_pb2.PortRef(port_id=made.meta.id, device_owner=made.device_owner))
    await requests.remember(txn, item.idempotency, made.meta.id)
    return made.meta.id
