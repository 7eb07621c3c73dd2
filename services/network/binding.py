"""Binding ports to nodes and realizing their networks there: desired state, then reconcile.

The port record is the truth. `bind` and `unbind` change, in one
transaction, the port (node, state BUILD or DOWN), its entry in the
network's port index, the network's attachments record (bound ports per
node) and a pending-realization marker for every (network, node) whose
desired state changed: the node itself and, when the node is the first to
join the network or the last of its ports leaves, every other node carrying
the network (their VXLAN peer lists change).

A `Realizer` then brings each marked node to its desired state: the
network's VNI, MTU and subnets, the tunnel addresses of the other nodes
carrying it (from their NodeReports, through the scheduler) and every port
of the network bound there, sent whole as ``network.ensure_network``; or
``network.remove_network`` once no port of the network is bound on it. On
success the node's BUILD ports become ACTIVE and the marker is deleted with
a compare on the revision read before the desired state was: a change that
landed meanwhile keeps it, so the node is realized again on the newer state.
`bind`/`unbind` realize at once; the realizer loop (every
``networking.realize_interval``) re-realizes whatever is left marked — a
replica that died mid-bind, an agent that did not answer — so nothing stays
half done.

Realizations of one pair take turns, and every caller that arrives while a
turn waits to start shares it (`Turns`; the first turn of a burst waits 20 ms
for the rest): a burst of binds on one node costs one or two
``ensure_network`` round trips, not one each. The bound ports'
own filters are defined before the bind answers (the domain's interface
names them); the nodes whose filters admit them through remote-group rules
get the groups' new member lists in the background (one task a node), one
refresh at a time, each for every bind, unbind and delete since the last one
began, after a pause as long as the last refresh took (1.5 to 3 seconds).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from google.protobuf import message
from nubis.agent.v1 import tasks_pb2
from nubis.network.v1 import ipam_pb2, network_pb2, port_pb2, subnet_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import peers
from services.common import errors, resources, tasks
from services.common.settings import NetworkSettings
from services.common.store import Store, Txn, Versioned
from services.common.task_sender import TaskSender
from services.network import keys, port_filter

log = structlog.get_logger(__name__)

Port = port_pb2.Port
Pair = tuple[str, str]  # (network id, node name)
DEFAULT_OWNER = "compute:nova"
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Seconds the first realization of a burst on one (network, node) waits for the burst's
# other binds: the ports of servers booted together, created a few milliseconds apart,
# then share one ensure_network and their filters go out together (four at once: the last
# bind answered after ~0.2 s, in the second of two realizations, instead of ~0.1 s).
_GATHER = 0.02
# Pairs one realizer pass works on at once.
_CONCURRENCY = 8
# Seconds an UP answer about a node is trusted before a realization asks again.
_UP_TRUSTED = 2.0
# Node names one ListNodes of a realization's peers names (its filter's length stays well
# under the 2048 characters a filter may have, at 63 characters a name).
_NAMES_PER_LIST = 24
# Seconds the background refresh of remote-group filters lets a burst of binds gather.
# Every refresh sends each node holding the group's admitters its new member list (one
# agent task a node, which makes those filters again), so while binds keep coming its cost
# per bind is the nodes over the binds one pause gathers; members are admitted by their
# peers this long after their bind, about when Neutron's agents apply a member change
# (their loop runs every 2 s).
_MEMBERS_DELAY = 1.5
# The longest it waits: it waits as long as the last refresh took (a refresh of a big
# group's filters is costly on the agents too), so refreshing uses at most about half of
# the time while changes keep coming, and at most this long after the last one.
_MEMBERS_DELAY_MAX = 3.0
# Port records one read of a realization's desired state takes (well under etcd's
# limit of operations in one transaction, 128 by default).
_READ_BATCH = 64
T = TypeVar("T")


class Turns:
    """One run of a job per key at a time; callers arriving while a run waits share it.

    A run that has started reads its state after every caller that joined it
    committed theirs, so each caller's change is covered by the run it awaits.
    A run that finds its key idle (the first of a burst) waits `gather` seconds
    before it starts, so the burst's other callers share it instead of
    queueing for the next run.
    """

    def __init__(self, gather: float = 0.0) -> None:
        self._gather = gather
        self._waiting: dict[Hashable, asyncio.Future[Any]] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}

    async def run(self, key: Hashable, job: Callable[[], Awaitable[T]]) -> T:
        """The result of the next run of `job` for `key` that starts after this call."""
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = asyncio.ensure_future(self._turn(key, job))
            self._waiting[key] = waiting
        result: T = await asyncio.shield(waiting)
        return result

    async def _turn(self, key: Hashable, job: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            first_of_burst = not lock.locked()
            async with lock:
                if first_of_burst and self._gather:
                    await asyncio.sleep(self._gather)
                if self._waiting.get(key) is asyncio.current_task():
                    del self._waiting[key]  # started: later callers need a newer run
                return await job()
        finally:
            if key not in self._waiting and not lock.locked():
                self._locks.pop(key, None)


_NETWORK_TURNS: dict[str, asyncio.Lock] = {}


def network_turn(network_id: str) -> asyncio.Lock:
    """This replica's turn at writing one network's attachments record.

    Every bind, unbind and delete of a bound port of the network rewrites that
    one record; taking turns here (the transaction is short) spares a burst of
    them the conflicts that would otherwise exhaust their retries.
    """
    lock = _NETWORK_TURNS.get(network_id)
    if lock is None:
        lock = _NETWORK_TURNS[network_id] = asyncio.Lock()
    return lock


# The network of every port this replica made or read. A port never moves to another
# network, so an id once known stays right; a port deleted since fails in its own
# transaction, which reads the port. Emptied when full (then read again as needed).
_PORT_NETWORKS: dict[str, str] = {}
_PORT_NETWORKS_MAX = 100_000


def remember_network(port_id: str, network_id: str) -> None:
    """Note the network of a port (see `_PORT_NETWORKS`)."""
    if len(_PORT_NETWORKS) >= _PORT_NETWORKS_MAX:
        _PORT_NETWORKS.clear()
    _PORT_NETWORKS[port_id] = network_id


async def _network_of(store: Store, port_id: str) -> str:
    known = _PORT_NETWORKS.get(port_id)
    if known:
        return known
    found = await store.find(keys.port(port_id), Port) if resources.is_uuid(port_id) else None
    if found is None:
        return ""
    remember_network(port_id, found.value.network_id)
    return found.value.network_id


def _mark(txn: Txn, pairs: Iterable[Pair], cause: str) -> None:
    for network_id, node in pairs:
        txn.put(keys.pending(network_id, node),
                ipam_pb2.PendingRealization(network_id=network_id, node=node, cause=cause))


async def _attachments(txn: Txn, network_id: str) -> ipam_pb2.NetworkAttachments:
    found = await txn.get(keys.attachments(network_id), ipam_pb2.NetworkAttachments)
    return found.value if found is not None else ipam_pb2.NetworkAttachments(
        network_id=network_id)


def _save(txn: Txn, record: ipam_pb2.NetworkAttachments) -> None:
    if record.node_ports:
        txn.put(keys.attachments(record.network_id), record)
    else:
        txn.delete(keys.attachments(record.network_id))


async def attach_in_txn(txn: Txn, network_id: str, node: str) -> list[Pair]:
    """Count one more bound port of the network on `node`; mark what must be realized."""
    record = await _attachments(txn, network_id)
    others = [name for name in record.node_ports if name != node]
    record.node_ports[node] = record.node_ports.get(node, 0) + 1
    _save(txn, record)
    changed = [(network_id, node)]
    if record.node_ports[node] == 1:
        changed += [(network_id, name) for name in others]  # a new VXLAN peer
    _mark(txn, changed, "bind")
    return changed


async def detach_in_txn(txn: Txn, network_id: str, node: str) -> list[Pair]:
    """Count one bound port fewer on `node`; the last one leaving takes the network away."""
    record = await _attachments(txn, network_id)
    left = record.node_ports.get(node, 0) - 1
    changed = [(network_id, node)]
    if left <= 0:
        record.node_ports.pop(node, None)
        changed += [(network_id, name) for name in record.node_ports]  # one peer fewer
    else:
        record.node_ports[node] = left
    _save(txn, record)
    _mark(txn, changed, "unbind")
    return changed


def _check_bind(request: port_pb2.BindPortRequest) -> None:
    violations = errors.ViolationCollector()
    if not resources.is_uuid(request.id):
        violations.add("id", "must be a UUID")
    if not _NODE.fullmatch(request.node):
        violations.add("node", "a node name: 1-63 letters, digits or _.- starting alphanumeric")
    if not request.device_id or len(request.device_id) > 255:
        violations.add("device_id", "1-255 characters")
    if len(request.device_owner) > 255:
        violations.add("device_owner", "at most 255 characters")
    violations.check("invalid binding")


def _index(txn: Txn, record: Port) -> None:
    txn.put(keys.network_port(record.network_id, record.meta.id), ipam_pb2.PortRef(
        port_id=record.meta.id, node=record.node, device_owner=record.device_owner))


async def _port(txn: Txn, port_id: str) -> Port:
    found = await txn.get(keys.port(port_id), Port)
    if found is None:
        raise errors.NotFound(f"port {port_id} not found", metadata={"port_id": port_id})
    return found.value


async def _bind_in_txn(txn: Txn, request: port_pb2.BindPortRequest) -> list[Pair]:
    """One bind inside a transaction (it may carry other binds of the network: each reads
    the attachments record as the binds before it left it)."""
    owner = request.device_owner or DEFAULT_OWNER
    record = await _port(txn, request.id)
    if (record.node, record.device_id, record.device_owner) == (
            request.node, request.device_id, owner):
        if record.state == Port.ACTIVE:
            return []
        _mark(txn, [(record.network_id, record.node)], "bind")
        return [(record.network_id, record.node)]
    changed: list[Pair] = []
    if record.node and record.node != request.node:
        changed += await detach_in_txn(txn, record.network_id, record.node)
    if record.node != request.node:
        changed += await attach_in_txn(txn, record.network_id, request.node)
    else:
        _mark(txn, [(record.network_id, request.node)], "bind")
    record.node, record.device_id, record.device_owner = request.node, request.device_id, owner
    record.state = Port.BUILD
    record.binding_details.clear()
    record.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.port(record.meta.id), record)
    _index(txn, record)
    return changed or [(record.network_id, request.node)]


@dataclass
class _Bind:
    """One bind waiting for its network's next commit."""

    request: port_pb2.BindPortRequest
    done: asyncio.Future[list[Pair]]


# Binds waiting per (store, network), and the task committing them.
_BINDS: dict[tuple[int, str], list[_Bind]] = {}
_BINDERS: dict[tuple[int, str], asyncio.Task[None]] = {}
# Most binds one transaction carries (each writes its port, its index entry and a marker;
# etcd refuses more than 128 operations a branch).
_MAX_BINDS = 16


async def bind_in_store(store: Store, request: port_pb2.BindPortRequest) -> list[Pair]:
    """The bind transaction alone: the port BUILD on the node, markers for its realization.

    Binding the same port to the same node and device again changes nothing
    (a port not ACTIVE yet is marked again, so it gets realized); binding it
    to another node moves it (the old node's realization changes too). The
    binds of one network that arrive while one commits share the next
    transaction: they all rewrite the network's attachments record, so one at
    a time they would queue for a commit each.
    """
    _check_bind(request)
    key = (id(store), await _network_of(store, request.id))
    item = _Bind(request, asyncio.get_running_loop().create_future())
    _BINDS.setdefault(key, []).append(item)
    running = _BINDERS.get(key)
    if running is None or running.done() or running.get_loop() is not item.done.get_loop():
        _BINDERS[key] = asyncio.get_running_loop().create_task(_drain_binds(store, key))
    return await item.done


async def _drain_binds(store: Store, key: tuple[int, str]) -> None:
    # No await between the emptiness check and the return: a bind queued later finds
    # this task done and starts another.
    while _BINDS.get(key):
        queue = _BINDS[key]
        batch, queue[:] = queue[:_MAX_BINDS], queue[_MAX_BINDS:]
        if not queue:
            del _BINDS[key]
        async with network_turn(key[1]):
            await _commit_binds(store, key[1], batch)
    if _BINDERS.get(key) is asyncio.current_task():
        del _BINDERS[key]


async def _commit_binds(store: Store, network_id: str, batch: list[_Bind]) -> None:
    """One transaction for `batch`; each bind gets its pairs or its own error."""
    async def body(txn: Txn) -> list[list[Pair] | errors.NubisError]:
        wanted: list[tuple[str, type[message.Message]]] = [
            (keys.port(item.request.id), Port) for item in batch]
        if network_id:  # what a bind that joins or leaves a node reads too
            wanted.append((keys.attachments(network_id), ipam_pb2.NetworkAttachments))
        await txn.get_many(wanted)
        outcomes: list[list[Pair] | errors.NubisError] = []
        for item in batch:
            try:  # a port gone fails before it wrote anything
                outcomes.append(await _bind_in_txn(txn, item.request))
            except errors.NubisError as exc:
                outcomes.append(exc)
        return outcomes

    try:
        outcomes = await store.atomic(body)
    except BaseException as exc:
        _settle(batch, [exc] * len(batch))
        if not isinstance(exc, Exception):
            raise
        return
    _settle(batch, outcomes)


def _settle(batch: list[_Bind], outcomes: Sequence[list[Pair] | BaseException]) -> None:
    for item, outcome in zip(batch, outcomes, strict=True):
        if item.done.done():  # its caller gave up
            continue
        if isinstance(outcome, BaseException):
            item.done.set_exception(outcome)
        else:
            item.done.set_result(outcome)


async def unbind_in_store(store: Store, request: port_pb2.UnbindPortRequest) -> list[Pair]:
    """The unbind transaction alone: the port DOWN and off its node. Unbound already: no-op."""
    resources.check_id(request.id, "id")

    async def body(txn: Txn) -> list[Pair]:
        record = await _port(txn, request.id)
        if not record.node:
            return []
        changed = await detach_in_txn(txn, record.network_id, record.node)
        record.node = ""
        record.state = Port.DOWN
        record.binding_details.clear()
        if not request.keep_device:
            record.device_id = record.device_owner = ""
        record.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.port(record.meta.id), record)
        _index(txn, record)
        return changed

    async with network_turn(await _network_of(store, request.id)):
        return await store.atomic(body)


@dataclass
class Realizer:
    """Brings (network, node) pairs to their desired state; one per service replica."""

    store: Store
    settings: NetworkSettings
    sender: TaskSender
    clients: peers.ServiceClients
    _turns: Turns = field(default_factory=lambda: Turns(gather=_GATHER))
    _groups: set[str] = field(default_factory=set)
    _refresher: asyncio.Future[None] | None = None
    _refresh_took: float = 0.0
    _up_seen: dict[str, float] = field(default_factory=dict)

    async def realize_all(self, pairs: Iterable[Pair]) -> None:
        """Realize each pair (at most a few at once); failures stay pending for the loop."""
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def one(pair: Pair) -> None:
            async with gate:
                await self.realize(*pair)

        await asyncio.gather(*(one(pair) for pair in dict.fromkeys(pairs)))

    async def realize(self, network_id: str, node: str) -> bool:
        """Realize one pair if it is marked; True once it converged (or was not marked).

        Shares the pair's next turn with every caller arriving before it starts.
        """
        async def job() -> bool:
            try:
                return await self._realize(network_id, node)
            except errors.NubisError as exc:
                log.warning("network not realized on node; will retry", network_id=network_id,
                            node=node, error=exc.message, reason=exc.reason)
                return False

        return await self._turns.run((network_id, node), job)

    async def _marked(self, network_id: str, node: str) -> list[Versioned[Any] | None]:
        """The pair's marker, the network and its attachments, in one round trip."""
        async def body(txn: Txn) -> list[Versioned[Any] | None]:
            return await txn.get_many([
                (keys.pending(network_id, node), ipam_pb2.PendingRealization),
                (keys.network(network_id), network_pb2.Network),
                (keys.attachments(network_id), ipam_pb2.NetworkAttachments)])

        return await self.store.atomic(body)  # reads only: no commit

    async def _realize(self, network_id: str, node: str) -> bool:
        marker, net, attachments = await self._marked(network_id, node)
        if marker is None:
            return True
        nodes = dict(attachments.value.node_ports) if attachments is not None else {}
        if await self.node_down(node):  # nobody to answer: left marked for when it is back
            log.info("node is DOWN; network realization left pending", network_id=network_id,
                     node=node)
            return False
        operation = tasks.new_operation_id()
        if net is None or nodes.get(node, 0) <= 0:
            await self.sender.send(node, tasks.REMOVE_NETWORK,
                                   tasks_pb2.RemoveNetworkRequest(network_id=network_id),
                                   operation_id=operation, deadline=self.settings.realize_timeout)
            details: dict[str, str] = {}
        else:
            desired, building = await self.desired_state(net.value, node,
                                                         [n for n in nodes if n != node])
            answer = await self.sender.send(node, tasks.ENSURE_NETWORK, desired,
                                            operation_id=operation,
                                            deadline=self.settings.realize_timeout)
            details = {"bridge": answer.bridge, "vxlan": answer.vxlan,
                       "dataplane": answer.dataplane}
            await self._activate(network_id, node, building, details)
        try:
            await self.store.delete(keys.pending(network_id, node),
                                    expect_revision=marker.mod_revision)
        except (errors.Conflict, errors.NotFound):
            return False  # changed meanwhile: the newer state is realized on the next pass
        log.info("network realized on node", network_id=network_id, node=node,
                 cause=marker.value.cause, operation_id=operation, removed=not details)
        return True

    async def desired_state(self, net: network_pb2.Network, node: str, peers_: list[str]
                            ) -> tuple[tasks_pb2.EnsureNetworkRequest, list[Versioned[Port]]]:
        """What `node` must hold of the network: subnets, VXLAN peers, its bound ports; and
        those of the ports that were BUILD when read (the ones a realization may activate),
        as read."""
        subnets = await asyncio.gather(*(self.store.find(keys.subnet(sid), subnet_pb2.Subnet)
                                         for sid in net.subnet_ids))
        refs, _ = await self.store.list_all(keys.network_ports(net.meta.id), ipam_pb2.PortRef)
        found = await self._ports([ref.value.port_id for ref in refs if ref.value.node == node])
        desired = tasks_pb2.EnsureNetworkRequest(
            network_id=net.meta.id, vni=net.segmentation_id, mtu=net.mtu,
            vxlan_peers=await self.tunnel_addresses(peers_))
        for item in subnets:
            if item is not None:
                desired.subnets.append(_dataplane_subnet(item.value))
        building: list[Versioned[Port]] = []
        for bound in found:
            if bound is not None and bound.value.node == node:
                desired.ports.append(_dataplane_port(bound.value))
                if bound.value.state == Port.BUILD:
                    building.append(bound)
        return desired, building

    async def _ports(self, port_ids: list[str]) -> list[Versioned[Port] | None]:
        """The records of `port_ids` (None: gone), `_READ_BATCH` to a round trip."""
        async def chunk(ids: list[str]) -> list[Versioned[Port] | None]:
            async def body(txn: Txn) -> list[Versioned[Port] | None]:
                return await txn.get_many([(keys.port(pid), Port) for pid in ids])

            return await self.store.atomic(body)  # reads only: no commit

        chunks = await asyncio.gather(*(chunk(port_ids[i:i + _READ_BATCH])
                                        for i in range(0, len(port_ids), _READ_BATCH)))
        return [found for part in chunks for found in part]

    async def node_down(self, node: str) -> bool:
        """True if the scheduler has `node` DOWN; an UP answer is trusted for a couple of seconds
        (one GetNode per node then, however many binds), an unknown node or scheduler is UP."""
        now = asyncio.get_running_loop().time()
        if now - self._up_seen.get(node, -_UP_TRUSTED) < _UP_TRUSTED:
            return False
        try:
            found = await self.clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=node))
        except errors.NubisError:
            return False
        if found.state == scheduler_pb2.NODE_STATE_DOWN:
            return True
        self._up_seen[node] = now
        return False

    async def tunnel_addresses(self, nodes: list[str]) -> list[str]:
        """The VXLAN endpoints of `nodes`, from their reports (a node that is gone: left out);
        one ListNodes naming them (`_NAMES_PER_LIST` a call), not a GetNode each."""
        async def listed(names: list[str]) -> dict[str, str]:
            reply = await self.clients.scheduler.ListNodes(scheduler_pb2.ListNodesRequest(
                filter="name=" + ",".join(names), page_size=len(names)))
            return {node.name: node.tunnel_address for node in reply.nodes}

        wanted = sorted(set(nodes))
        found: dict[str, str] = {}
        for part in await asyncio.gather(*(listed(wanted[i:i + _NAMES_PER_LIST])
                                           for i in range(0, len(wanted), _NAMES_PER_LIST))):
            found.update(part)
        addresses: list[str] = []
        for name in wanted:
            address = found.get(name, "")
            if address and address not in addresses:
                addresses.append(address)
        return addresses

    async def _activate(self, network_id: str, node: str, building: list[Versioned[Port]],
                        details: dict[str, str]) -> None:
        """Ports of `building` (read BUILD) still BUILD and bound on `node` become ACTIVE, with
        their filters."""
        async def chunk(read: list[Versioned[Port]]) -> list[str]:
            async def body(txn: Txn) -> list[str]:
                turned = []
                for port in read:  # as read: a port changed since makes the commit run again
                    txn.assume(keys.port(port.value.meta.id), port.value, port.mod_revision)
                for port in read:
                    found = await txn.get(keys.port(port.value.meta.id), Port)
                    if found is not None and _activated(found.value, network_id, node, details):
                        txn.put(keys.port(found.value.meta.id), found.value)
                        turned.append(found.value.meta.id)
                return turned  # a port gone or not BUILD any more: nothing written

            return await self.store.atomic(body)

        chunks = await asyncio.gather(*(chunk(building[i:i + _READ_BATCH])
                                        for i in range(0, len(building), _READ_BATCH)))
        activated = [port_id for part in chunks for port_id in part]
        if not activated:
            return
        # Bound and wired: now their security groups' filters; the remote-group rules
        # elsewhere that admit them follow in the background.
        self.refresh_members(await port_filter.define_bound(self.store, self.sender, activated))

    def refresh_members(self, groups: Iterable[str]) -> None:
        """Soon re-send the filters admitting members of `groups` (coalesced, in background)."""
        self._groups.update(groups)
        if self._groups and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.ensure_future(self._refresh_members())

    async def _refresh_members(self) -> None:
        """One refresh at a time, each for every group named since the last one began, after
        a pause as long as the last one took (at least `_MEMBERS_DELAY`, at most
        `_MEMBERS_DELAY_MAX`): a burst of binds or deletes shares few refreshes."""
        clock = asyncio.get_running_loop()
        while self._groups:
            await asyncio.sleep(min(_MEMBERS_DELAY_MAX, max(_MEMBERS_DELAY, self._refresh_took)))
            groups, self._groups = self._groups, set()
            started = clock.time()
            try:
                await port_filter.refresh(self.store, self.sender, members_of=groups,
                                          background=True)
            except errors.NubisError as exc:  # the next bind or rule change sends them again
                log.warning("remote-group filters not refreshed", error=exc.message)
            self._refresh_took = clock.time() - started

    async def pass_once(self) -> int:
        """Realize every pair still marked; returns how many are left marked."""
        items, _ = await self.store.list_all(keys.REALIZE, ipam_pb2.PendingRealization)
        pairs = [(item.value.network_id, item.value.node) for item in items]
        await self.realize_all(pairs)
        return len(pairs)

    async def loop(self) -> None:
        """Forever: a pass, then `realize_interval` seconds (supervised by the service)."""
        while True:
            await self.pass_once()
            await asyncio.sleep(self.settings.realize_interval)


def _activated(record: Port, network_id: str, node: str, details: dict[str, str]) -> bool:
    """`record` ACTIVE with `details` if it is still BUILD and bound on `node`; else False."""
    if record.node != node or record.network_id != network_id or record.state != Port.BUILD:
        return False
    record.state = Port.ACTIVE
    record.binding_details.clear()
    record.binding_details.update(details)
    return True


def _dataplane_subnet(subnet: subnet_pb2.Subnet) -> tasks_pb2.DataplaneSubnet:
    return tasks_pb2.DataplaneSubnet(
        id=subnet.meta.id, cidr=subnet.cidr, gateway_ip=subnet.gateway_ip,
        dhcp_enabled=subnet.dhcp_enabled, dns_nameservers=list(subnet.dns_nameservers),
        host_routes=[tasks_pb2.DataplaneHostRoute(destination=route.destination,
                                                  nexthop=route.nexthop)
                     for route in subnet.host_routes],
        dhcp_address=subnet.dhcp_address)


def _dataplane_port(record: Port) -> tasks_pb2.DataplanePort:
    return tasks_pb2.DataplanePort(
        id=record.meta.id, mac_address=record.mac_address,
        fixed_ips=[tasks_pb2.DataplaneFixedIp(subnet_id=fixed.subnet_id,
                                              ip_address=fixed.ip_address)
                   for fixed in record.fixed_ips],
        host_name=record.meta.name if _NODE.fullmatch(record.meta.name or "-") else "")


async def bind(store: Store, realizer: Realizer, request: port_pb2.BindPortRequest) -> Port:
    """Bind the port to the node (idempotent), realize it there, return the port.

    The port comes back ACTIVE once the node realized it, or BUILD if the
    node did not answer (the realizer loop finishes the job).
    """
    changed = await bind_in_store(store, request)
    # A port that turns ACTIVE gets its filter then (`Realizer._activate`), whichever
    # replica or pass realizes it; a node that did not realize is not asked for a filter.
    await realizer.realize_all(changed)
    return await _fresh(store, request.id)


async def unbind(store: Store, realizer: Realizer, request: port_pb2.UnbindPortRequest) -> Port:
    """Unbind the port (idempotent); its node loses its DHCP entry, or the network."""
    before = await store.find(keys.port(request.id), Port) \
        if resources.is_uuid(request.id) else None
    changed = await unbind_in_store(store, request)
    await realizer.realize_all(changed)
    if before is not None:
        gone = bool(before.value.node) and await realizer.node_down(before.value.node)
        realizer.refresh_members(await port_filter.on_unbind(realizer.sender, before.value,
                                                             node_down=gone))
    return await _fresh(store, request.id)


async def _fresh(store: Store, port_id: str) -> Port:
    found = await store.get(keys.port(port_id), Port)
    record = Port()
    record.CopyFrom(found.value)
    record.meta.revision = found.mod_revision
    return record
