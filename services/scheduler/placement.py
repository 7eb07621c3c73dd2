"""Placement: choose nodes for instances and claim their resources atomically.

A decision runs the filters and weighers on the informer's cache. Its claim is
one etcd transaction (`Store.atomic`) that checks the instance still fits each
chosen node and writes the new usage together with the consumer's allocation
record (and its server group membership). Like a Placement resource-provider
generation, the transaction compares every record the node's capacity was
derived from: its usage, its operator settings, its agent's report and the
cloud's default ratios. So two replicas that chose the same node cannot both
commit past its capacity, and a replica whose cache missed a lowered ratio, a
disabled node or a shrunken report cannot commit on the old figures: the loser
re-reads, judges the node again on the fresh records, and if it no longer
takes the claim, plans again with them. Losing is bounded by time
(`claim_timeout`), not by a count of lost rounds: on a hot node a claim may
lose many rounds in a row while room is left, and it must not fail for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, resources
from services.common.settings import SchedulerSettings
from services.common.store import Store, Txn, Versioned
from services.scheduler import cache as cache_module
from services.scheduler import filters, keys, model, server_groups, validation, weighers
from services.scheduler import metrics as metrics_module

NO_VALID_NODE = "nubis.scheduler.no_valid_node"
# A consumer already holds allocations other than the ones asked for.
CONSUMER_EXISTS = "nubis.scheduler.consumer_exists"
Choice = tuple[model.ConsumerId, model.NodeView]
# Re-plans of one claim in a row before each next one waits a little.
REPLANS_WITHOUT_PAUSE = 3


@dataclass(frozen=True, slots=True)
class _Learned:
    """A node's report and settings as a claim read them, fresher than its decision's."""

    name: str
    report: Versioned[scheduler_pb2.NodeReport] | None
    settings: Versioned[scheduler_pb2.NodeSettings] | None
    # The report revision the decision saw: an absent report is gone since after it.
    report_seen: int


class _Stale(Exception):
    """The fresh records no longer allow the plan; plan again on them."""

    def __init__(self, usage: Versioned[scheduler_pb2.NodeUsage] | None = None) -> None:
        super().__init__("plan is stale")
        self.usage = usage


def no_valid_node(result: filters.FilterResult, index: int, count: int) -> errors.ResourceExhausted:
    """RESOURCE_EXHAUSTED naming how many nodes each filter removed."""
    which = f" for instance {index + 1} of {count}" if count > 1 else ""
    metadata = {name: str(removed) for name, removed in result.removed.items()}
    metadata["nodes"] = str(result.considered)
    return errors.ResourceExhausted(
        f"no valid node{which}: {result.explain()}", reason=NO_VALID_NODE, metadata=metadata
    )


def demand_of(spec: scheduler_pb2.RequestSpec, resources: scheduler_pb2.Resources) -> (
    filters.Demand
):
    return filters.Demand(
        resources=model.amounts(resources),
        required_traits=frozenset(spec.required_traits),
        forbidden_traits=frozenset(spec.forbidden_traits),
        availability_zone=spec.availability_zone,
        hypervisor_type=spec.hypervisor_type,
        avoid_nodes=frozenset(spec.avoid_nodes),
    )


def validate_spec(spec: scheduler_pb2.RequestSpec, *, need_consumers: bool) -> int:
    """Every fault of the request at once; returns the instance count."""
    found = errors.ViolationCollector()
    validation.resources(spec.resources, "spec.resources", found, require_some=True)
    count = spec.count or len(spec.consumer_ids) or 1
    if count < 1 or count > validation.MAX_COUNT:
        found.add("spec.count", f"must be between 1 and {validation.MAX_COUNT}")
    if need_consumers:
        if len(spec.consumer_ids) != count:
            found.add("spec.consumer_ids", f"one consumer id per instance ({count}) is required")
        if len(set(spec.consumer_ids)) != len(spec.consumer_ids):
            found.add("spec.consumer_ids", "consumer ids must be unique")
    validation.traits(list(spec.required_traits), "spec.required_traits", found)
    validation.traits(list(spec.forbidden_traits), "spec.forbidden_traits", found)
    if set(spec.required_traits) & set(spec.forbidden_traits):
        found.add("spec.forbidden_traits", "a trait cannot be both required and forbidden")
    found.check("invalid request spec")
    for index, consumer in enumerate(spec.consumer_ids):
        validation.identifier(consumer, f"spec.consumer_ids[{index}]", "consumer")
    if spec.server_group_id:
        validation.identifier(spec.server_group_id, "spec.server_group_id", "server group")
    return count


@dataclass
class Placement:
    """Node selection and allocation bookkeeping over the store and the node cache."""

    store: Store
    cache: cache_module.NodeCache
    settings: SchedulerSettings
    rng: random.Random
    metrics: metrics_module.ClaimMetrics = field(default_factory=metrics_module.ClaimMetrics)
    # Node -> claims of this replica in flight there (see weighers.best).
    busy: dict[str, int] = field(default_factory=dict, init=False)
    turns: NodeTurns = field(default_factory=lambda: NodeTurns(), init=False)

    # -- choosing ----------------------------------------------------------

    def plan(
        self, views: Sequence[model.NodeView] | None, consumers: Sequence[model.ConsumerId],
        demand: filters.Demand,
    ) -> list[Choice]:
        """Pick a node per consumer, counting earlier picks of the same request.

        The candidates are `views`, or with None every node of the cache.
        """
        planned: dict[str, model.NodeView] = {}
        group_nodes = dict(demand.group_nodes)
        choices: list[Choice] = []
        for index, consumer in enumerate(consumers):
            step = replace(demand, group_nodes=dict(group_nodes)) if choices else demand
            chosen = self._choose(views, step, planned, index, len(consumers))
            planned[chosen.name] = model.with_used(
                chosen, model.plus(chosen.used, demand.resources),
                chosen.allocation_count + 1, chosen.usage_revision,
            )
            group_nodes[chosen.name] = group_nodes.get(chosen.name, 0) + 1
            choices.append((consumer, chosen))
        return choices

    def _choose(
        self, views: Sequence[model.NodeView] | None, demand: filters.Demand,
        planned: dict[str, model.NodeView], index: int, count: int,
    ) -> model.NodeView:
        """One node for one instance: at random among the `host_subset_size` best."""
        if views is None and weighers.independent_of_request(demand):
            # The common case reads the head of the cache's weight order.
            subset = max(1, self.settings.host_subset_size)
            walked = self.cache.ranking.walk(demand, subset, self.busy, planned)
            if not walked.passed:
                raise no_valid_node(walked, index, count)
            return self.rng.choice(walked.passed)
        nodes = self.cache.views() if views is None else views
        candidates = [planned.get(v.name, v) for v in nodes] if planned else nodes
        start = self.rng.randrange(len(candidates)) if candidates else 0
        result = filters.run(candidates, demand, limit=self.settings.max_candidates,
                             start=start)
        if not result.passed:
            raise no_valid_node(result, index, count)
        return weighers.best(result.passed, demand, self.settings, self.rng, self.busy,
                             self.cache.ranking.scale)[0]

    async def decide_and_commit(
        self, demand: filters.Demand, consumers: Sequence[model.ConsumerId],
        group: scheduler_pb2.ServerGroup | None, commit: Commit,
        views: Callable[[], Sequence[model.NodeView]] | None = None,
    ) -> list[Choice]:
        """Plan on the cache and commit; after a lost race, plan again on fresher data.

        A lost compare is never the caller's failure: the claim goes on, judged
        on the records the failed commit returned, until it commits, until
        those records leave no room (the plan's RESOURCE_EXHAUSTED), or until
        `claim_timeout` has passed (UNAVAILABLE; never ABORTED).
        """
        if group is not None:
            demand = replace(demand, group_policy=group.policy,
                             group_nodes=server_groups.node_counts(group, exclude=consumers))
        clock = asyncio.get_running_loop()
        deadline = clock.time() + self.settings.claim_timeout
        for rounds in itertools.count():
            choices = self.plan(views() if views is not None else None, consumers, demand)
            guard = NodeGuard(self.cache.ratio_record(), demand, self.cache.usage)
            try:
                await self._commit(commit, choices, guard, deadline)
            except _Stale:
                if clock.time() >= deadline:
                    break
                await self._before_replanning(rounds)
                if group is not None:
                    group = await server_groups.fetch(self.store, group.meta.id)
                    demand = replace(demand, group_nodes=server_groups.node_counts(
                        group, exclude=consumers))
                continue
            except errors.Conflict:
                break  # lost every compare until the deadline
            self.metrics.claims.inc()
            return choices
        raise contention()

    async def _before_replanning(self, rounds: int) -> None:
        """A short jittered pause once a claim has had to re-plan a few times in a row.

        The next plan already runs on the fresh records the lost commit
        returned; the pause only spreads out claims that keep colliding.
        """
        if rounds >= REPLANS_WITHOUT_PAUSE:
            await asyncio.sleep(self.rng.uniform(0, min(0.05, 0.002 * rounds)))

    def _learn(self, guard: NodeGuard) -> None:
        """Teach the cache the fresher records a claim read, so the next plan uses them."""
        if guard.learned_ratios is not None:
            self.cache.observe_ratios(guard.learned_ratios)
        for learned in guard.learned:
            self.cache.observe_report(learned.name, learned.report, learned.report_seen)
            if learned.settings is not None:
                self.cache.observe_settings(learned.settings)

    async def _commit(
        self, commit: Commit, choices: list[Choice], guard: NodeGuard, deadline: float
    ) -> list[UsageRecord]:
        """Run the claim transaction, marking its nodes busy while it is in flight.

        Each lost compare reruns the transaction on the fresh records it
        returned (re-judging the node there) until `deadline`, not a count.
        """
        names = [node.name for _, node in choices]
        for name in names:
            self.busy[name] = self.busy.get(name, 0) + 1
        try:
            async with self.turns.taking(names, deadline):
                # Whatever the outcome, the cache learns what the claim read or
                # wrote before the next decision (or the claim waiting for this
                # turn) runs, rather than when the watch delivers it.
                try:
                    claimed = await self.store.atomic(
                        _bind(commit, choices, guard, self.metrics), deadline=deadline)
                except _Stale as stale:
                    if stale.usage is not None:
                        self.cache.observe_usage(stale.usage)
                    raise
                finally:
                    self._learn(guard)
                for usage in claimed:
                    self.cache.observe_usage(usage)
                return claimed
        finally:
            for name in names:
                left = self.busy.pop(name) - 1
                if left:
                    self.busy[name] = left

    async def select_destinations(
        self, spec: scheduler_pb2.RequestSpec, project_id: str
    ) -> list[scheduler_pb2.Destination]:
        """Choose a node for each consumer of `spec` and claim them all, or none."""
        count = validate_spec(spec, need_consumers=True)
        consumers = [model.ConsumerId(c) for c in spec.consumer_ids][:count]
        group = None
        if spec.server_group_id:
            group = await server_groups.fetch(self.store, spec.server_group_id)
            if group.meta.project_id != project_id:
                # Another project's group: as if it did not exist (never join it,
                # never let its rules steer this project's instances).
                raise errors.NotFound(f"server group {spec.server_group_id} not found",
                                      metadata={"server_group_id": spec.server_group_id})

        async def commit(txn: Txn, choices: list[Choice], guard: NodeGuard) -> list[UsageRecord]:
            return await claim_new(txn, choices, spec, project_id, guard)

        try:
            choices = await self.decide_and_commit(
                demand_of(spec, spec.resources), consumers, group, commit
            )
        except errors.AlreadyExists:
            # A retry after a lost reply finds its own claims: answer them again.
            return await self._claimed_before(spec, consumers, project_id)
        except errors.ResourceExhausted:
            # The same retry after its own claim filled the node: no plan fits any
            # more, yet the answer is the claim it holds. (Checked here, when no
            # plan fits, rather than before planning: a read of every consumer
            # on the hot path would cost each claim one more etcd round trip.)
            held = await self._claimed_before(spec, consumers, project_id, none_ok=True)
            if not held:
                raise
            return held
        return [
            scheduler_pb2.Destination(
                consumer_id=consumer, node_name=node.name, queue=node.last_report.queue
            )
            for consumer, node in choices
        ]

    async def _claimed_before(
        self, spec: scheduler_pb2.RequestSpec, consumers: Sequence[model.ConsumerId],
        project_id: str, *, none_ok: bool = False,
    ) -> list[scheduler_pb2.Destination]:
        """The destinations of an identical earlier claim, else ALREADY_EXISTS.

        With `none_ok`, [] when no consumer holds any allocation.
        """
        records = [await self.store.find(keys.allocations(consumer),
                                         scheduler_pb2.ConsumerAllocations)
                   for consumer in consumers]
        if none_ok and all(held is None for held in records):
            return []
        destinations = []
        for consumer, held in zip(consumers, records, strict=True):
            if held is None or not _same_claim(held.value, spec, project_id):
                raise errors.AlreadyExists(
                    f"consumer {consumer} already holds other allocations",
                    reason=CONSUMER_EXISTS, metadata={"consumer_id": consumer})
            node_name = held.value.allocations[0].node_name
            view = self.cache.view(node_name)
            queue = view.last_report.queue if view is not None else ""
            destinations.append(scheduler_pb2.Destination(
                consumer_id=consumer, node_name=node_name, queue=queue or f"node.{node_name}"))
        return destinations


def contention() -> errors.Unavailable:
    """A claim that lost its races until its time ran out: retryable, never ABORTED."""
    return errors.Unavailable("too many concurrent claims on the same nodes; retry",
                              reason="nubis.scheduler.contention")


class NodeTurns:
    """One claim transaction per node at a time within this replica.

    Two claims of one replica on the same node would only lose their compares
    to each other. Waiting for the one in flight costs less than losing to it
    and running again, and the next then commits on the usage the first wrote
    (the cache has learned it by then). Other replicas still race through the
    compares. A multi-node claim takes its nodes in name order (no deadlock).
    """

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def taking(self, names: Iterable[str], deadline: float) -> AsyncIterator[None]:
        """Hold the turn of every node in `names`; UNAVAILABLE if `deadline` passes first."""
        ordered = sorted(set(names))
        for name in ordered:
            self._holders[name] = self._holders.get(name, 0) + 1
        taken: list[asyncio.Lock] = []
        try:
            async with asyncio.timeout_at(deadline):
                for name in ordered:
                    lock = self._locks.setdefault(name, asyncio.Lock())
                    await lock.acquire()
                    taken.append(lock)
            yield
        except TimeoutError:
            if len(taken) == len(ordered):
                raise  # not ours: raised inside the turn
            raise contention() from None
        finally:
            for lock in reversed(taken):
                lock.release()
            for name in ordered:
                self._release(name)

    def _release(self, name: str) -> None:
        left = self._holders.pop(name) - 1
        if left:
            self._holders[name] = left
        else:
            # Nobody holds or waits for it: forget it (10,000 nodes, few hot at once).
            self._locks.pop(name, None)


UsageRecord = Versioned[scheduler_pb2.NodeUsage]
# The informer's usage record of a node and its revision (NodeCache.usage).
KnownUsage = Callable[[str], tuple[scheduler_pb2.NodeUsage, int] | None]


def _same_claim(
    held: scheduler_pb2.ConsumerAllocations, spec: scheduler_pb2.RequestSpec, project_id: str
) -> bool:
    """Is `held` exactly what a claim of `spec` makes (one node, same amounts and owner)?"""
    return (len(held.allocations) == 1 and held.allocations[0].resources == spec.resources
            and held.project_id == project_id and held.server_group_id == spec.server_group_id)


def _bind(
    commit: Commit, choices: list[Choice], guard: NodeGuard,
    claim_metrics: metrics_module.ClaimMetrics,
) -> Callable[[Txn], Awaitable[list[UsageRecord]]]:
    runs = 0

    async def body(txn: Txn) -> list[UsageRecord]:
        nonlocal runs
        # The store runs the body again only after the commit's compare failed.
        if runs:
            claim_metrics.conflicts.inc()
        runs += 1
        return await commit(txn, choices, guard)

    return body


# -- the claim transaction ---------------------------------------------------


async def change_usage(
    txn: Txn, node_name: str, delta: model.Amounts, count: int,
    usable: model.Amounts | None, known: KnownUsage | None = None,
) -> UsageRecord:
    """Add `delta` to a node's usage in `txn`; with `usable`, only if it still fits.

    With `known`, the informer's copy of the usage record stands in for the
    read (the commit still compares its revision): a claim is then a single
    etcd round trip, and a stale copy only costs a rerun on the fresh record.
    """
    key = keys.node_usage(node_name)
    if known is not None:
        held = known(node_name)
        txn.assume(key, held[0] if held else None, held[1] if held else 0)
    fresh = await txn.get(key, scheduler_pb2.NodeUsage)
    usage = scheduler_pb2.NodeUsage(name=node_name)
    if fresh is not None:
        usage.CopyFrom(fresh.value)
    total = model.plus(model.amounts(usage.used), delta)
    if usable is not None and not model.within(total, usable):
        raise _Stale(fresh)
    # A release never drives usage below zero, even after manual repairs.
    usage.used.CopyFrom(model.to_resources((max(0, total[0]), max(0, total[1]),
                                            max(0, total[2]))))
    usage.allocation_count = max(0, usage.allocation_count + count)
    txn.put(key, usage)
    revision = fresh.mod_revision if fresh is not None else 0
    return Versioned(key, usage, revision, revision)


def _revision(record: Versioned[Any] | None) -> int:
    return record.mod_revision if record is not None else 0


@dataclass
class NodeGuard:
    """Inside a claim transaction: does each chosen node still take what was planned there?

    The decision judged a node on the cache's copies of its report, settings
    and usage. The transaction assumes those copies (no read: the common claim
    stays one etcd round trip) and compares their revisions. A run that finds
    any of them moved judges the node again on the fresh records, never on the
    decision's view: up, enabled, still matching the request, and the claim
    within the capacity they give.
    """

    # The cloud's default-ratios record and its revision, as the decision's cache held it.
    ratios: tuple[scheduler_pb2.DefaultAllocationRatios | None, int] = (None, 0)
    demand: filters.Demand | None = None
    known: KnownUsage | None = None
    # Fresher records than the decision's, read by some run (the cache learns them).
    learned: list[_Learned] = field(default_factory=list)
    learned_ratios: Versioned[scheduler_pb2.DefaultAllocationRatios] | None = None

    async def claim(
        self, txn: Txn, node: model.NodeView, delta: model.Amounts, count: int
    ) -> UsageRecord:
        """Add `delta` to the node's usage in `txn` if the node still takes it."""
        usable = await self.usable(txn, node)
        return await change_usage(txn, node.name, delta, count, usable, self.known)

    async def usable(self, txn: Txn, node: model.NodeView) -> model.Amounts:
        """The node's usable capacity on the records `txn` compares (_Stale if it is out)."""
        report_key, settings_key = keys.node_report(node.name), keys.node_settings(node.name)
        txn.assume(report_key, node.report, node.report_revision)
        txn.assume(settings_key, node.settings, node.settings_revision)
        report = await txn.get(report_key, scheduler_pb2.NodeReport)
        settings = await txn.get(settings_key, scheduler_pb2.NodeSettings)
        ratios = await self._ratios(txn)
        if (_revision(report) == node.report_revision
                and _revision(settings) == node.settings_revision
                and _revision(ratios) == node.ratios_revision):
            return node.usable
        self.learned.append(_Learned(node.name, report, settings, node.report_revision))
        fresh = model.make_view(
            node.name, report.value if report is not None else None,
            settings.value if settings is not None else None, None, 0,
            model.default_ratios(ratios.value if ratios is not None else None),
        )
        if not filters.run([fresh], self._constraints()).passed:
            raise _Stale()
        return fresh.usable

    async def _ratios(self, txn: Txn) -> Versioned[scheduler_pb2.DefaultAllocationRatios] | None:
        """The cloud's default ratios as `txn` compares them (assumed from the cache)."""
        key = keys.default_ratios()
        txn.assume(key, *self.ratios)
        found = await txn.get(key, scheduler_pb2.DefaultAllocationRatios)
        if found is not None and found.mod_revision != self.ratios[1]:
            self.learned_ratios = found
        return found

    def _constraints(self) -> filters.Demand:
        """What the node itself must satisfy; usage and the group are checked apart."""
        if self.demand is None:
            return filters.Demand(resources=model.ZERO)
        return replace(self.demand, resources=model.ZERO,
                       group_policy=filters.Policy.SERVER_GROUP_POLICY_UNSPECIFIED,
                       group_nodes={})


Commit = Callable[[Txn, list[Choice], NodeGuard], Awaitable[list[UsageRecord]]]


async def claim_new(
    txn: Txn, choices: list[Choice], spec: scheduler_pb2.RequestSpec, project_id: str,
    guard: NodeGuard,
) -> list[UsageRecord]:
    """Usage of every chosen node, the allocation records, the group membership."""
    by_node: dict[str, list[Choice]] = {}
    for choice in choices:
        by_node.setdefault(choice[1].name, []).append(choice)
    want = model.amounts(spec.resources)
    claimed = []
    for same_node in by_node.values():
        node, times = same_node[0][1], len(same_node)
        need = (want[0] * times, want[1] * times, want[2] * times)
        claimed.append(await guard.claim(txn, node, need, times))
    if spec.server_group_id:
        await join_group(txn, spec.server_group_id, choices)
    now = resources.now()
    for consumer, node in choices:
        record = scheduler_pb2.ConsumerAllocations(
            consumer_id=consumer, project_id=project_id,
            server_group_id=spec.server_group_id, create_time=now, update_time=now,
        )
        record.allocations.add(node_name=node.name).resources.CopyFrom(spec.resources)
        # Compared absent: a consumer already holding allocations makes the
        # whole claim fail with ALREADY_EXISTS (then told apart from a retry).
        txn.create(keys.allocations(consumer), record)
    return claimed


async def join_group(
    txn: Txn, group_id: str, choices: Sequence[Choice], *, required: bool = True
) -> None:
    """Record where members land, if the group's hard policy still allows it."""
    fresh = await txn.get(keys.server_group(group_id), scheduler_pb2.ServerGroup)
    if fresh is None and not required:
        return
    if fresh is None:
        raise errors.NotFound(f"server group {group_id} not found",
                              metadata={"server_group_id": group_id})
    group = scheduler_pb2.ServerGroup()
    group.CopyFrom(fresh.value)
    placed = [(str(consumer), str(node.name)) for consumer, node in choices]
    if not server_groups.allows(group, placed):
        raise _Stale()
    for consumer, node_name in placed:
        group.member_nodes[consumer] = node_name
    txn.put(keys.server_group(group_id), group)
