"""The node cache's weight order: its best-first walk returns what a full weigh would.

The oracle filters every node (filters.run) and weighs every passing one
(weighers.weigh, the cluster-wide scale); the walk must return nodes of the
very same weights, best first, after any sequence of incremental changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from hypothesis import given, settings
from hypothesis import strategies as st
from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import SchedulerSettings
from services.scheduler import filters, model, ranking, weighers

Policy = scheduler_pb2.ServerGroupPolicy
NAMES = [f"n{index:02d}" for index in range(24)]
TRAITS = ("CUSTOM_A", "CUSTOM_B")


@dataclass(frozen=True)
class Spec:
    """One node's records, drawn small so that equal weights and full nodes are common."""

    name: str
    capacity: model.Amounts
    used: model.Amounts
    up: bool
    disabled: bool
    traits: tuple[str, ...]
    zone: str
    cpu_ratio: float | None


specs = st.builds(
    Spec,
    name=st.sampled_from(NAMES),
    capacity=st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([512, 1024, 2048]),
                       st.sampled_from([10, 20])),
    used=st.tuples(st.integers(0, 70), st.integers(0, 3500), st.integers(0, 25)),
    up=st.sampled_from([True, True, True, False]),
    disabled=st.sampled_from([False, False, False, True]),
    traits=st.sampled_from([(), ("CUSTOM_A",), ("CUSTOM_A", "CUSTOM_B")]),
    zone=st.sampled_from(["az1", "az1", "az2"]),
    cpu_ratio=st.sampled_from([None, None, 1.0, 4.0]),
)

scheduler_settings = st.builds(
    SchedulerSettings,
    weigher=st.sampled_from(["spread", "pack"]),
    cpu_weight_multiplier=st.sampled_from([0.0, 1.0, 2.5, -1.0]),
    ram_weight_multiplier=st.sampled_from([0.0, 1.0, 3.0]),
    disk_weight_multiplier=st.sampled_from([0.0, 1.0, 0.5]),
    host_subset_size=st.integers(1, 5),
)

demands = st.builds(
    filters.Demand,
    resources=st.tuples(st.integers(0, 8), st.integers(0, 1024), st.integers(0, 10)),
    required_traits=st.sampled_from([frozenset(), frozenset({"CUSTOM_A"})]),
    forbidden_traits=st.sampled_from([frozenset(), frozenset(), frozenset({"CUSTOM_B"})]),
    availability_zone=st.sampled_from(["", "", "az1"]),
    avoid_nodes=st.frozensets(st.sampled_from(NAMES), max_size=3),
    group_policy=st.sampled_from([Policy.SERVER_GROUP_POLICY_UNSPECIFIED,
                                  Policy.ANTI_AFFINITY, Policy.AFFINITY,
                                  Policy.SOFT_ANTI_AFFINITY]),
    group_nodes=st.dictionaries(st.sampled_from(NAMES), st.integers(1, 2), max_size=3),
)


def view_of(spec: Spec) -> model.NodeView:
    report = scheduler_pb2.NodeReport(
        name=spec.name, capacity=model.to_resources(spec.capacity), traits=spec.traits,
        availability_zone=spec.zone, hypervisor_type="QEMU",
    )
    node_settings = scheduler_pb2.NodeSettings(name=spec.name, disabled=spec.disabled)
    node_settings.last_report.CopyFrom(report)
    if spec.cpu_ratio is not None:
        node_settings.allocation_ratios.cpu = spec.cpu_ratio
    usage = scheduler_pb2.NodeUsage(name=spec.name, used=model.to_resources(spec.used))
    return model.make_view(model.NodeName(spec.name), report if spec.up else None,
                           node_settings, usage, 3, model.BUILT_IN_RATIOS)


def expected(
    views: dict[str, model.NodeView], demand: filters.Demand, chosen: SchedulerSettings,
    wanted: int, busy: frozenset[str] = frozenset(),
) -> tuple[list[float], filters.FilterResult]:
    """The weights a full filter-and-weigh over every node puts first."""
    everything = list(views.values())
    full = filters.run(everything, demand)
    weights = weighers.weigh(full.passed, demand, chosen, weighers.scale_of(everything))
    idle = sorted((w for w, v in zip(weights, full.passed, strict=True) if v.name not in busy),
                  reverse=True)
    spare = sorted((w for w, v in zip(weights, full.passed, strict=True) if v.name in busy),
                   reverse=True)
    return idle[:wanted] + spare[:max(0, wanted - len(idle))], full


def check_walk(
    order: ranking.Ranking, views: dict[str, model.NodeView], demand: filters.Demand,
    chosen: SchedulerSettings, busy: frozenset[str] = frozenset(),
    planned: dict[str, model.NodeView] | None = None,
) -> None:
    wanted = chosen.host_subset_size
    seen = dict(views) | (planned or {})
    want_weights, full = expected(seen, demand, chosen, wanted, busy)
    walked = order.walk(demand, wanted, busy, planned)
    assert order.scale == weighers.scale_of(views.values())
    weights = weighers.coefficients(order.scale, chosen)
    got = [weighers.resource_weight(view.free, weights) for view in walked.passed]
    assert got == want_weights
    assert len({view.name for view in walked.passed}) == len(walked.passed)
    passing = {view.name: view for view in full.passed}
    assert all(passing.get(view.name) == view for view in walked.passed)
    if not full.passed:
        # A walk that found nothing has counted every node, filter by filter.
        assert walked.removed == full.removed
        assert walked.considered == len(seen) == full.considered


def ranked_demand(demand: filters.Demand) -> filters.Demand:
    """The walk serves requests whose weight is the resource weight alone."""
    if weighers.independent_of_request(demand):
        return demand
    return replace(demand, group_nodes={})


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, max_size=30), demands, scheduler_settings)
def test_walk_matches_a_full_weigh(
    nodes: list[Spec], demand: filters.Demand, chosen: SchedulerSettings
) -> None:
    order = ranking.Ranking(chosen, random.Random(1))
    views: dict[str, model.NodeView] = {}
    for spec in nodes:
        views[spec.name] = view_of(spec)
        order.put(views[spec.name])
    check_walk(order, views, ranked_demand(demand), chosen)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(specs, min_size=1, max_size=20), demands, scheduler_settings,
    st.lists(st.tuples(st.sampled_from(["put", "remove", "walk"]), specs), max_size=40),
)
def test_walk_matches_a_full_weigh_after_incremental_changes(
    nodes: list[Spec], demand: filters.Demand, chosen: SchedulerSettings,
    changes: list[tuple[str, Spec]],
) -> None:
    order = ranking.Ranking(chosen, random.Random(2))
    views: dict[str, model.NodeView] = {}
    demand = ranked_demand(demand)
    for spec in nodes:
        views[spec.name] = view_of(spec)
        order.put(views[spec.name])
    # A walk settles the order, so the changes after it move nodes one by one.
    check_walk(order, views, demand, chosen)
    for action, spec in changes:
        if action == "put":
            views[spec.name] = view_of(spec)
            order.put(views[spec.name])
        elif action == "remove":
            views.pop(spec.name, None)
            order.remove(spec.name)
        else:
            check_walk(order, views, demand, chosen)
    assert len(order) == len(views)
    check_walk(order, views, demand, chosen)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(specs, min_size=1, max_size=30), demands, scheduler_settings,
    st.frozensets(st.sampled_from(NAMES), max_size=6),
    st.lists(st.sampled_from(NAMES), max_size=4),
)
def test_walk_puts_busy_nodes_last_and_merges_planned_ones(
    nodes: list[Spec], demand: filters.Demand, chosen: SchedulerSettings,
    busy: frozenset[str], planned_names: list[str],
) -> None:
    order = ranking.Ranking(chosen, random.Random(3))
    views: dict[str, model.NodeView] = {}
    for spec in nodes:
        views[spec.name] = view_of(spec)
        order.put(views[spec.name])
    demand = ranked_demand(demand)
    # Earlier instances of the same request, not yet in the cache's order.
    planned = {
        name: model.with_used(views[name], model.plus(views[name].used, demand.resources),
                              views[name].allocation_count + 1, views[name].usage_revision)
        for name in planned_names if name in views
    }
    check_walk(order, views, demand, chosen, busy, planned)


def test_equal_nodes_are_preferred_differently_by_differently_seeded_caches() -> None:
    chosen = SchedulerSettings(host_subset_size=1)
    demand = filters.Demand(resources=(1, 1, 1))
    firsts = set()
    for seed in range(20):
        order = ranking.Ranking(chosen, random.Random(seed))
        for name in NAMES:
            order.put(view_of(Spec(name, (4, 2048, 20), (0, 0, 0), True, False, (), "az1",
                                   None)))
        firsts.add(order.walk(demand, 1).passed[0].name)
    assert len(firsts) > 5


def test_a_walk_stops_early_when_the_best_pass() -> None:
    chosen = SchedulerSettings(host_subset_size=3)
    order = ranking.Ranking(chosen, random.Random(4))
    for index in range(5000):
        used = (index % 60, 0, 0)
        order.put(view_of(Spec(f"n{index:05d}", (4, 2048, 20), used, True, False, (),
                               "az1", None)))
    walked = order.walk(filters.Demand(resources=(1, 1, 1)), 3)
    assert walked.considered < 100
    assert [view.used[0] for view in walked.passed] == [0, 0, 0]
    # A demand no node can take walks them all and counts each one.
    too_big = order.walk(filters.Demand(resources=(100, 1, 1)), 3)
    assert too_big.passed == [] and too_big.considered == 5000
    assert too_big.removed["CapacityFilter"] == 5000
