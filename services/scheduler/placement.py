"""Placement: choose nodes for instances and claim their resources atomically.

A decision runs the filters and weighers on the informer's cache. Its claim is
one etcd transaction (`Store.atomic`) that checks the instance still fits each
chosen node and writes the new usage together with the consumer's allocation
record (and its server group membership). Like a Placement resource-provider
generation, the transaction compares every record the node's capacity was
derived from: its usage, its operator settings and its agent's report. So two
replicas that chose the same node cannot both commit past its capacity, and a
replica whose cache missed a lowered ratio, a disabled node or a shrunken
report cannot commit on the old figures: the loser re-reads, judges the node
again on the fresh records, and if it no longer takes the claim, plans again
with them.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
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
        """Plan on the cache and commit; after a lost race, plan again on fresher data."""
        if group is not None:
            demand = replace(demand, group_policy=group.policy,
                             group_nodes=server_groups.node_counts(group, exclude=consumers))
        for _ in range(self.settings.claim_attempts):
            choices = self.plan(views() if views is not None else None, consumers, demand)
            guard = NodeGuard(self.settings, demand, self.cache.usage)
            try:
                claimed = await self._commit(commit, choices, guard)
            except _Stale as stale:
                self._learn(guard)
                if stale.usage is not None:
                    self.cache.observe_usage(stale.usage)
                if group is not None:
                    group = await server_groups.fetch(self.store, group.meta.id)
                    demand = replace(demand, group_nodes=server_groups.node_counts(
                        group, exclude=consumers))
                continue
            self.metrics.claims.inc()
            # Show our own claims to the next decision before the watch delivers them.
            self._learn(guard)
            for usage in claimed:
                self.cache.observe_usage(usage)
            return choices
        raise errors.Unavailable(
            "too many concurrent claims on the same nodes; retry",
            reason="nubis.scheduler.contention",
        )

    def _learn(self, guard: NodeGuard) -> None:
        """Teach the cache the fresher records a claim read, so the next plan uses them."""
        for learned in guard.learned:
            self.cache.observe_report(learned.name, learned.report, learned.report_seen)
            if learned.settings is not None:
                self.cache.observe_settings(learned.settings)

    async def _commit(
        self, commit: Commit, choices: list[Choice], guard: NodeGuard
    ) -> list[UsageRecord]:
        """Run the claim transaction, marking its nodes busy while it is in flight."""
        names = [node.name for _, node in choices]
        for name in names:
            self.busy[name] = self.busy.get(name, 0) + 1
        try:
            return await self.store.atomic(_bind(commit, choices, guard, self.metrics))
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
        return [
            scheduler_pb2.Destination(
                consumer_id=consumer, node_name=node.name, queue=node.last_report.queue
            )
            for consumer, node in choices
        ]

    async def _claimed_before(
        self, spec: scheduler_pb2.RequestSpec, consumers: Sequence[model.ConsumerId],
        project_id: str,
    ) -> list[scheduler_pb2.Destination]:
        """The destinations of an identical earlier claim, else ALREADY_EXISTS."""
        destinations = []
        for consumer in consumers:
            held = await self.store.find(keys.allocations(consumer),
                                         scheduler_pb2.ConsumerAllocations)
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

    defaults: SchedulerSettings
    demand: filters.Demand | None = None
    known: KnownUsage | None = None
    # Fresher records than the decision's, read by some run (the cache learns them).
    learned: list[_Learned] = field(default_factory=list)

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
        if (_revision(report) == node.report_revision
                and _revision(settings) == node.settings_revision):
            return node.usable
        self.learned.append(_Learned(node.name, report, settings, node.report_revision))
        fresh = model.make_view(
            node.name, report.value if report is not None else None,
            settings.value if settings is not None else None, None, 0, self.defaults,
        )
        if not filters.run([fresh], self._constraints()).passed:
            raise _Stale()
        return fresh.usable

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
