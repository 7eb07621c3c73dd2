"""The power-state sync: each instance's record made to tell what its node's libvirt runs.

Nova's `_sync_power_states`, run by the compute service: every
`compute.power_sync_interval` seconds it lists the instances, asks each UP
node that hosts some (`list_domains`) for its domains, and writes what it
finds into the records that are idle (no operation in flight):

- the domain's power state, always;
- an ACTIVE instance whose domain is shut off or crashed becomes STOPPED
  (the guest shut itself down; Nova calls its stop API);
- an ACTIVE or STOPPED instance whose domain is gone from its node (a host
  that rebooted with an empty hypervisor; a restarted agent on libvirt's test
  driver) becomes ERROR with reason `nubis.instance.domain_missing` saying
  so, never ACTIVE; one in ERROR (or VERIFY_RESIZE, the resize's to settle)
  keeps its state and fault and gets power state NOSTATE.

Each write compares the revision the instance was listed at, so an operation
that began meanwhile (or another replica's sync) wins and the instance waits
for the next round. A STOPPED instance whose domain runs is only recorded as
RUNNING, never powered off. Instances of a DOWN node keep their record as it
is (the node cannot be asked; its last known power state stays).

Domains nubis does not know (no instance id in their metadata, or the id of
no instance) and domains of an instance recorded on another node are logged
and counted (`nubis_compute_unmanaged_domains`). Those nubis does not know
are never destroyed: only an operator can know what they are. A domain of
an instance that settled on another node (no operation in flight, no move
naming this node, not VERIFY_RESIZE) is destroyed, as Nova destroys the
instances evacuated from a host that comes back: a spawn the node took just
before it died, run when its agent came back after the build had been
rescheduled elsewhere, must not leave a second domain running.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import prometheus_client
import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import peers
from services.common import errors, pages, resources, tasks
from services.common.store import Store, Versioned
from services.common.task_sender import TaskSender
from services.compute import instance as instance_module
from services.compute import keys
from services.compute.lifecycle import DOMAIN_MISSING, power_state

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
PowerState = instance_pb2.Instance.PowerState
NODE_CONCURRENCY = 8
"""Nodes asked for their domains at once in one round."""
LIST_DEADLINE = 15.0
"""Seconds a round waits for a node's domains (a node that just died is skipped, not waited
for the task's full deadline, so it delays the other nodes' sync at most this long)."""

# States whose record the sync may correct; the others are transient and owned
# by the operation that put the instance there.
_SYNCED = frozenset({Instance.ACTIVE, Instance.STOPPED, Instance.ERROR,
                     Instance.VERIFY_RESIZE})
_NEED_A_DOMAIN = frozenset({Instance.ACTIVE, Instance.STOPPED})
_DOWN_POWER = frozenset({Instance.POWER_STATE_SHUTDOWN, Instance.POWER_STATE_CRASHED})


class SyncMetrics:
    """What the sync found, for the service's /metrics (registered by main)."""

    def __init__(self) -> None:
        self.unmanaged = prometheus_client.Gauge(
            "nubis_compute_unmanaged_domains",
            "Domains on a node that nubis does not manage there, at the last sync: "
            "kind=unknown (no instance of nubis) or kind=stray (the instance is "
            "recorded on another node). Never destroyed by nubis.",
            ["node", "kind"], registry=None)
        self.corrected = prometheus_client.Counter(
            "nubis_compute_power_sync_corrections",
            "Instance records the power sync rewrote, by what it changed "
            "(power_state, stopped, domain_missing).",
            ["change"], registry=None)

    def register(self, registry: prometheus_client.CollectorRegistry) -> None:
        registry.register(self.unmanaged)
        registry.register(self.corrected)


@dataclass
class Round:
    """What one pass did."""

    nodes: int = 0
    """Nodes asked for their domains (and answering)."""
    skipped_nodes: list[str] = field(default_factory=list)
    """Nodes hosting instances that were DOWN, unknown to the scheduler or did not answer."""
    changes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Records rewritten, by change (power_state, stopped, domain_missing)."""
    unknown_domains: list[str] = field(default_factory=list)
    """node/domain of each domain nubis does not know."""
    stray_domains: list[str] = field(default_factory=list)
    """node/domain of each domain whose instance is recorded on another node."""


def corrected(instance: Instance, domain: tasks_pb2.DomainStatus | None,
              node: str) -> tuple[Instance, str] | None:
    """The record as it should be given the node's `domain` (None: it has none), and the
    change made; None if the record is right or is not the sync's to correct."""
    if instance.task_id or instance.state not in _SYNCED:
        return None
    fixed = Instance()
    fixed.CopyFrom(instance)
    if domain is None:
        fixed.power_state = Instance.POWER_STATE_NOSTATE
        if instance.state not in _NEED_A_DOMAIN:
            change = "power_state"  # ERROR keeps its fault; a resize's move is the move's
        else:
            fixed.state = Instance.ERROR
            was = Instance.State.Name(instance.state)
            fixed.fault.CopyFrom(resource_pb2.Fault(
                reason=DOMAIN_MISSING,
                message=f"domain {instance_module.domain_name(instance.meta.id)} is gone "
                        f"from node {node} (the instance was {was})",
                time=resources.now()))
            change = "domain_missing"
    else:
        fixed.power_state = power_state(domain.state)
        change = "power_state"
        if instance.state == Instance.ACTIVE and fixed.power_state in _DOWN_POWER:
            fixed.state = Instance.STOPPED
            change = "stopped"
    if fixed.state == instance.state and fixed.power_state == instance.power_state:
        return None
    fixed.meta.update_time.CopyFrom(resources.now())
    return fixed, change


LOGIN_THROTTLED = "nubis.auth.throttled"
"""Identity's answer to a login tried too often with a wrong password."""


class PowerSync:
    """This replica's power-state sync (every replica runs one; writes are revision-guarded)."""

    def __init__(self, store: Store, sender: TaskSender, clients: peers.ServiceClients,
                 interval: float, metrics: SyncMetrics | None = None) -> None:
        self.store = store
        self.sender = sender
        self.clients = clients
        self.interval = interval
        self.metrics = metrics or SyncMetrics()
        self._reported: set[tuple[str, str]] = set()
        """(node, domain) of the unmanaged domains already logged as warnings."""

    async def run_forever(self) -> None:
        """Sync, then wait `interval`, forever (run under services.common.supervise)."""
        while True:
            try:
                found = await self.sync_once()
            except (errors.Unauthenticated, errors.ResourceExhausted) as exc:
                if isinstance(exc, errors.ResourceExhausted) and exc.reason != LOGIN_THROTTLED:
                    raise
                # The service credential is refused: at a cloud's first start the
                # bootstrap may not have made the service user yet. Not a bug of
                # this loop: wait a round instead of crashing it (and the process).
                log.warning("power sync skipped: the service login was refused",
                            error=exc.message, retry_in=self.interval)
                await asyncio.sleep(self.interval)
                continue
            if found.changes:
                log.info("power sync", nodes=found.nodes, changes=dict(found.changes),
                         unknown=len(found.unknown_domains), stray=len(found.stray_domains),
                         skipped_nodes=found.skipped_nodes)
            await asyncio.sleep(self.interval)

    async def sync_once(self) -> Round:
        """One pass over every instance that has a node."""
        items, _ = await self.store.list_all(keys.INSTANCES, Instance,
                                             on_undecodable=_skip_undecodable)
        by_node: dict[str, list[Versioned[Instance]]] = defaultdict(list)
        for item in items:
            if item.value.node:
                by_node[item.value.node].append(item)
        up = await self._up_nodes()
        found = Round()
        limit = asyncio.Semaphore(NODE_CONCURRENCY)

        async def one(node: str) -> None:
            async with limit:
                await self._sync_node(node, by_node.get(node, []), found)

        await asyncio.gather(*(one(node) for node in sorted(up)))
        found.skipped_nodes = sorted(set(by_node) - up) + found.skipped_nodes
        return found

    async def _up_nodes(self) -> set[str]:
        up: set[str] = set()
        token = ""
        while True:
            page = await self.clients.scheduler.ListNodes(scheduler_pb2.ListNodesRequest(
                page_size=pages.MAX_PAGE_SIZE, page_token=token))
            up.update(node.name for node in page.nodes
                      if node.state == scheduler_pb2.NODE_STATE_UP)
            token = page.next_page_token
            if not token:
                return up

    async def _sync_node(self, node: str, hosted: Sequence[Versioned[Instance]],
                         found: Round) -> None:
        try:
            listing = await self.sender.send(node, tasks.LIST_DOMAINS,
                                             tasks_pb2.ListDomainsRequest(),
                                             operation_id=tasks.new_operation_id(),
                                             deadline=LIST_DEADLINE)
        except errors.NubisError as exc:
            log.warning("power sync: node did not list its domains", node=node,
                        reason=exc.reason, error=exc.message)
            found.skipped_nodes.append(node)
            return
        found.nodes += 1
        domains = {domain.name: domain for domain in listing.domains}
        for item in hosted:
            domain = domains.get(instance_module.domain_name(item.value.meta.id))
            await self._correct(item, domain, node, found)
        await self._unmanaged(node, listing.domains, hosted, found)

    async def _correct(self, item: Versioned[Instance], domain: tasks_pb2.DomainStatus | None,
                       node: str, found: Round) -> None:
        fix = corrected(item.value, domain, node)
        if fix is None:
            return
        record, change = fix
        try:
            await self.store.replace(item.key, record, expect_revision=item.mod_revision)
        except (errors.Conflict, errors.NotFound):
            return  # changed since the listing (an operation began): next round
        found.changes[change] += 1
        self.metrics.corrected.labels(change=change).inc()
        if change != "power_state":
            log.warning("power sync corrected an instance", instance_id=record.meta.id,
                        node=node, change=change,
                        state=Instance.State.Name(record.state),
                        power_state=Instance.PowerState.Name(record.power_state))

    async def _unmanaged(self, node: str, domains: Sequence[tasks_pb2.DomainStatus],
                         hosted: Sequence[Versioned[Instance]], found: Round) -> None:
        mine = {instance_module.domain_name(item.value.meta.id) for item in hosted}
        unknown = stray = 0
        seen: set[tuple[str, str]] = set()
        for domain in domains:
            if domain.name in mine:
                continue
            owner = await self._owner_node(domain)
            if owner is None:
                unknown += 1
                found.unknown_domains.append(f"{node}/{domain.name}")
                what = "a domain nubis does not know"
            elif owner and owner != node:
                if await self._reap(node, domain):
                    continue
                stray += 1
                found.stray_domains.append(f"{node}/{domain.name}")
                what = "a domain of an instance recorded on another node"
            else:
                continue
            seen.add((node, domain.name))
            report = log.debug if (node, domain.name) in self._reported else log.warning
            report(f"power sync: {what}", node=node, domain=domain.name, uuid=domain.uuid,
                   state=domain.state, instance_id=domain.instance_id, instance_node=owner)
        # Warned once per domain while it stays; again if it goes and comes back.
        self._reported = {item for item in self._reported if item[0] != node} | seen
        self.metrics.unmanaged.labels(node=node, kind="unknown").set(unknown)
        self.metrics.unmanaged.labels(node=node, kind="stray").set(stray)

    async def _reap(self, node: str, domain: tasks_pb2.DomainStatus) -> bool:
        """Destroy `domain` on `node` if its instance settled elsewhere; True if destroyed."""
        instance_id = domain.instance_id or _id_of_name(domain.name)
        fresh = await self.store.find(keys.instance(instance_id), Instance)
        if fresh is None or not settled_elsewhere(fresh.value, node):
            return False
        try:
            await self.sender.send(node, tasks.DESTROY, tasks_pb2.DestroyRequest(name=domain.name),
                                   operation_id=tasks.new_operation_id(), deadline=LIST_DEADLINE)
        except errors.NubisError as exc:
            log.warning("power sync: stray domain not destroyed", node=node, domain=domain.name,
                        reason=exc.reason, error=exc.message)
            return False
        log.warning("power sync: destroyed the domain of an instance that lives on another node",
                    node=node, domain=domain.name, instance_id=instance_id,
                    instance_node=fresh.value.node)
        return True

    async def _owner_node(self, domain: tasks_pb2.DomainStatus) -> str | None:
        """The node the domain's instance is recorded on ("" = none yet), None if no
        instance of nubis has this domain. Read from the store, not the round's listing,
        which may predate the instance or its move."""
        instance_id = domain.instance_id or _id_of_name(domain.name)
        if not instance_id:
            return None
        fresh = await self.store.find(keys.instance(instance_id), Instance)
        return None if fresh is None else fresh.value.node


def settled_elsewhere(instance: Instance, node: str) -> bool:
    """True if `instance` runs on another node than `node` for good: nothing in flight, no
    move naming `node` (a resize keeps its source until confirmed)."""
    move = instance.migration
    return (bool(instance.node) and instance.node != node and not instance.task_id
            and instance.state in (Instance.ACTIVE, Instance.STOPPED, Instance.ERROR)
            and node not in (move.source_node, move.destination_node))


def _skip_undecodable(key: str, mod_revision: int) -> None:
    """A record that is not an Instance is left out of the round (the loop must not crash
    on it again and again), and logged."""
    log.error("power sync: an instance record does not decode; skipped", key=key,
              mod_revision=mod_revision)


def _id_of_name(name: str) -> str:
    prefix = instance_module.domain_name("")
    rest = name[len(prefix):] if name.startswith(prefix) else ""
    return rest if resources.is_uuid(rest) else ""
