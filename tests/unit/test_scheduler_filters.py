"""Filters, weighers and capacity arithmetic of the scheduler (pure functions)."""

from __future__ import annotations

import random

from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import SchedulerSettings
from services.scheduler import filters, model, weighers

DEFAULTS = SchedulerSettings()
Policy = scheduler_pb2.ServerGroupPolicy


def node(
    name: str,
    *,
    vcpus: int = 4,
    memory_mb: int = 8192,
    disk_gb: int = 100,
    used: model.Amounts = model.ZERO,
    up: bool = True,
    settings: scheduler_pb2.NodeSettings | None = None,
    traits: tuple[str, ...] = (),
    zone: str = "nova",
    hypervisor: str = "QEMU",
) -> model.NodeView:
    report = scheduler_pb2.NodeReport(
        name=name,
        capacity=scheduler_pb2.Resources(vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb),
        traits=traits,
        availability_zone=zone,
        hypervisor_type=hypervisor,
    )
    if not up:
        settings = settings or scheduler_pb2.NodeSettings(name=name)
        settings.last_report.CopyFrom(report)
    usage = scheduler_pb2.NodeUsage(name=name, used=model.to_resources(used))
    return model.make_view(
        model.NodeName(name), report if up else None, settings, usage, 7, model.BUILT_IN_RATIOS
    )


def test_usable_applies_reserved_then_ratio() -> None:
    settings = scheduler_pb2.NodeSettings(
        reserved=scheduler_pb2.Resources(vcpus=1, memory_mb=1024, disk_gb=10),
    )
    settings.allocation_ratios.cpu = 2.0
    view = node("n1", settings=settings)
    # cpu (4-1)*2, ram (8192-1024)*1.5 default, disk (100-10)*1.0 default
    assert view.usable == (6, 10752, 90)


def test_default_ratios_match_nova() -> None:
    ratios = model.effective_ratios(None, model.default_ratios(None))
    assert (ratios.cpu, ratios.ram, ratios.disk) == (16.0, 1.5, 1.0)


def test_a_node_ratio_wins_over_the_cloud_default() -> None:
    cloud = scheduler_pb2.DefaultAllocationRatios(
        ratios=scheduler_pb2.AllocationRatios(cpu=4.0, ram=1.0, disk=2.0))
    own = scheduler_pb2.NodeSettings()
    own.allocation_ratios.ram = 3.0
    ratios = model.effective_ratios(own, model.default_ratios(cloud))
    assert (ratios.cpu, ratios.ram, ratios.disk) == (4.0, 3.0, 2.0)


def test_down_node_keeps_its_last_capacity_but_is_filtered() -> None:
    view = node("gone", up=False)
    assert view.usable[0] == 64
    result = filters.run([view], filters.Demand(resources=(1, 1, 1)))
    assert result.passed == []
    assert result.removed["ComputeFilter"] == 1


def test_disabled_node_is_filtered() -> None:
    view = node("off", settings=scheduler_pb2.NodeSettings(disabled=True))
    assert filters.run([view], filters.Demand(resources=(1, 1, 1))).passed == []


def test_capacity_filter_counts_exact_fit() -> None:
    full = node("full", vcpus=1, memory_mb=1024, disk_gb=10, used=(16, 1536, 10))
    exact = node("exact", vcpus=1, memory_mb=1024, disk_gb=10, used=(15, 1024, 5))
    result = filters.run([full, exact], filters.Demand(resources=(1, 512, 5)))
    assert [view.name for view in result.passed] == ["exact"]
    assert result.removed["CapacityFilter"] == 1
    assert "CapacityFilter removed 1" in result.explain()


def test_traits_zone_hypervisor_and_avoid() -> None:
    nodes = [
        node("ssd", traits=("CUSTOM_SSD",)),
        node("gpu", traits=("CUSTOM_SSD", "CUSTOM_GPU")),
        node("other-zone", traits=("CUSTOM_SSD",), zone="az2"),
        node("xen", traits=("CUSTOM_SSD",), hypervisor="XEN"),
        node("avoided", traits=("CUSTOM_SSD",)),
    ]
    demand = filters.Demand(
        resources=(1, 1, 1),
        required_traits=frozenset({"CUSTOM_SSD"}),
        forbidden_traits=frozenset({"CUSTOM_GPU"}),
        availability_zone="nova",
        hypervisor_type="qemu",
        avoid_nodes=frozenset({"avoided"}),
    )
    result = filters.run(nodes, demand)
    assert [view.name for view in result.passed] == ["ssd"]
    assert result.removed == {
        "ComputeFilter": 0,
        "AvoidNodesFilter": 1,
        "AvailabilityZoneFilter": 1,
        "HypervisorTypeFilter": 1,
        "TraitsFilter": 1,
        "CapacityFilter": 0,
    }


def test_operator_traits_and_zone_override_the_report() -> None:
    settings = scheduler_pb2.NodeSettings(traits=["CUSTOM_FAST"], availability_zone="az9")
    view = node("n", traits=("COMPUTE_TEST",), settings=settings)
    assert view.traits == {"COMPUTE_TEST", "CUSTOM_FAST"}
    assert view.availability_zone == "az9"


def test_hard_affinity_and_anti_affinity() -> None:
    nodes = [node("a"), node("b"), node("c")]
    anti = filters.Demand(
        resources=(1, 1, 1), group_policy=Policy.ANTI_AFFINITY, group_nodes={"a": 1, "b": 1}
    )
    assert [view.name for view in filters.run(nodes, anti).passed] == ["c"]
    affinity = filters.Demand(
        resources=(1, 1, 1), group_policy=Policy.AFFINITY, group_nodes={"b": 2}
    )
    assert [view.name for view in filters.run(nodes, affinity).passed] == ["b"]
    first = filters.Demand(resources=(1, 1, 1), group_policy=Policy.AFFINITY)
    assert len(filters.run(nodes, first).passed) == 3


def test_spread_prefers_free_and_pack_prefers_full() -> None:
    empty, busy = node("empty"), node("busy", used=(30, 8000, 50))
    demand = filters.Demand(resources=(1, 1, 1))
    spread = weighers.weigh([empty, busy], demand, DEFAULTS)
    assert spread[0] > spread[1]
    pack = weighers.weigh([empty, busy], demand, SchedulerSettings(weigher="pack"))
    assert pack[0] < pack[1]


def test_soft_policies_weigh_group_members() -> None:
    settings = SchedulerSettings(host_subset_size=1)
    a, b = node("a"), node("b")
    soft = filters.Demand(
        resources=(1, 1, 1), group_policy=Policy.SOFT_AFFINITY, group_nodes={"b": 1}
    )
    assert weighers.best([a, b], soft, settings, random.Random(1))[0].name == "b"
    soft_anti = filters.Demand(
        resources=(1, 1, 1), group_policy=Policy.SOFT_ANTI_AFFINITY, group_nodes={"a": 1}
    )
    assert weighers.best([a, b], soft_anti, settings, random.Random(1))[0].name == "b"


def test_best_picks_among_the_subset_then_falls_back_by_weight() -> None:
    nodes = [node(f"n{i}", used=(i, i * 100, i)) for i in range(10)]
    settings = SchedulerSettings(host_subset_size=3, claim_attempts=6)
    demand = filters.Demand(resources=(1, 1, 1))
    firsts = {weighers.best(nodes, demand, settings, random.Random(seed))[0].name
              for seed in range(50)}
    assert firsts == {"n0", "n1", "n2"}
    order = weighers.best(nodes, demand, settings, random.Random(3))
    assert [view.name for view in order[3:]] == ["n3", "n4", "n5"]


def test_large_candidate_lists_are_sampled_before_weighing() -> None:
    nodes = [node(f"n{i}", used=(i, 0, 0)) for i in range(50)]
    settings = SchedulerSettings(max_candidates=10, host_subset_size=1, claim_attempts=1)
    demand = filters.Demand(resources=(1, 1, 1))
    firsts = {weighers.best(nodes, demand, settings, random.Random(seed))[0].name
              for seed in range(30)}
    # Without sampling the emptiest node (n0) would win every time.
    assert len(firsts) > 1
    unsampled = SchedulerSettings(host_subset_size=1)
    assert weighers.best(nodes, demand, unsampled, random.Random(1))[0].name == "n0"


def test_a_limited_scan_stops_once_enough_nodes_passed() -> None:
    views = [node(f"n{i:03d}", used=(4 * 16, 0, 0) if i % 2 else model.ZERO)
             for i in range(400)]
    demand = filters.Demand(resources=(1, 512, 1))
    result = filters.run(views, demand, limit=100, start=390)
    assert len(result.passed) == 100 and result.considered < len(views)
    assert all(view.free[0] >= 1 for view in result.passed)
    # The scan starts at `start` and wraps around the end of the list.
    assert result.passed[0].name == "n390" and "n000" in {v.name for v in result.passed}
    # Every other node is full; the last chunk may pass more than the limit keeps.
    assert result.removed["CapacityFilter"] == result.considered // 2


def test_a_limited_scan_that_finds_too_few_counts_every_node() -> None:
    views = [node(f"n{i:03d}", up=i != 7) for i in range(300)]
    demand = filters.Demand(resources=(1, 512, 1), required_traits=frozenset({"CUSTOM_GPU"}))
    result = filters.run(views, demand, limit=50, start=123)
    assert result.passed == [] and result.considered == 300
    assert result.removed == {"ComputeFilter": 1, "TraitsFilter": 299, "CapacityFilter": 0}


def test_nodes_with_claims_in_flight_go_last() -> None:
    views = [node("big", vcpus=64), node("mid", vcpus=32), node("small", vcpus=8)]
    settings = SchedulerSettings(host_subset_size=1)
    demand = filters.Demand(resources=(1, 0, 0))
    ranked = weighers.best(views, demand, settings, random.Random(3), busy={"big"})
    assert [view.name for view in ranked] == ["mid", "small", "big"]
    # With every node busy, the order is the weighers' own.
    ranked = weighers.best(views, demand, settings, random.Random(3),
                           busy={"big", "mid", "small"})
    assert [view.name for view in ranked] == ["big", "mid", "small"]
