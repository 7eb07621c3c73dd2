"""The claim transaction trusts the informer's copies (usage, settings, report) only as far
as etcd confirms them."""

from __future__ import annotations

import pytest
from nubis.scheduler.v1 import scheduler_pb2

from services.common.store import Lease, Store, Txn
from services.scheduler import keys, model, placement


def _usage(vcpus: int) -> scheduler_pb2.NodeUsage:
    return scheduler_pb2.NodeUsage(name="n1", used=scheduler_pb2.Resources(vcpus=vcpus),
                                   allocation_count=vcpus)


async def test_a_stale_cached_usage_never_loses_an_update(store: Store) -> None:
    old = await store.create(keys.node_usage("n1"), _usage(3))
    await store.replace(keys.node_usage("n1"), _usage(4), expect_revision=old.mod_revision)
    runs = 0

    def stale(name: str) -> tuple[scheduler_pb2.NodeUsage, int]:
        return old.value, old.mod_revision

    async def body(txn: Txn) -> placement.UsageRecord:
        nonlocal runs
        runs += 1
        return await placement.change_usage(txn, "n1", (1, 0, 0), 1, None, stale)

    await store.atomic(body)
    fresh = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert fresh.value.used.vcpus == 5 and fresh.value.allocation_count == 5
    assert runs == 2  # the assumed copy lost its compare; the rerun used etcd's record


async def test_a_current_cached_usage_saves_the_read(store: Store) -> None:
    held = await store.create(keys.node_usage("n1"), _usage(2))

    def current(name: str) -> tuple[scheduler_pb2.NodeUsage, int]:
        return held.value, held.mod_revision

    async def body(txn: Txn) -> placement.UsageRecord:
        return await placement.change_usage(txn, "n1", (2, 0, 0), 1, (4, 0, 0), current)

    claimed = await store.atomic(body)
    assert claimed.mod_revision == held.mod_revision
    fresh = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert model.amounts(fresh.value.used) == (4, 0, 0)


async def test_an_assumed_absent_record_that_exists_is_reread(store: Store) -> None:
    await store.create(keys.node_usage("n1"), _usage(1))

    async def body(txn: Txn) -> placement.UsageRecord:
        return await placement.change_usage(txn, "n1", (1, 0, 0), 1, None, lambda name: None)

    await store.atomic(body)
    fresh = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert fresh.value.used.vcpus == 2


# -- the node's capacity inputs: report and settings --------------------------


async def _view(store: Store, name: str) -> model.NodeView:
    """The node as a decision would see it, with the revisions of its records."""
    report = await store.find(keys.node_report(name), scheduler_pb2.NodeReport)
    settings = await store.find(keys.node_settings(name), scheduler_pb2.NodeSettings)
    usage = await store.find(keys.node_usage(name), scheduler_pb2.NodeUsage)
    return model.make_view(
        model.NodeName(name), report.value if report else None,
        settings.value if settings else None, usage.value if usage else None,
        usage.mod_revision if usage else 0, model.BUILT_IN_RATIOS,
        report_revision=report.mod_revision if report else 0,
        settings_revision=settings.mod_revision if settings else 0,
    )


async def _put_report(store: Store, report: scheduler_pb2.NodeReport, lease: Lease) -> None:
    async def body(txn: Txn) -> None:
        txn.put(keys.node_report(report.name), report, lease=lease)

    await store.atomic(body)


def _report(vcpus: int) -> scheduler_pb2.NodeReport:
    return scheduler_pb2.NodeReport(name="n1", capacity=scheduler_pb2.Resources(
        vcpus=vcpus, memory_mb=4096, disk_gb=100), queue="node.n1")


async def _claim(
    store: Store, guard: placement.NodeGuard, view: model.NodeView, vcpus: int
) -> int:
    """Claim `vcpus` on the node through `guard`; how many times the body ran."""
    runs = 0

    async def body(txn: Txn) -> placement.UsageRecord:
        nonlocal runs
        runs += 1
        return await guard.claim(txn, view, (vcpus, 0, 0), 1)

    await store.atomic(body)
    return runs


async def test_a_claim_on_current_records_commits_in_one_run(store: Store) -> None:
    lease = await store.grant_lease(30)
    await _put_report(store, _report(8), lease)
    await store.create(keys.node_settings("n1"), scheduler_pb2.NodeSettings(name="n1"))
    view = await _view(store, "n1")
    # The agent's keep-alives refresh the lease without rewriting the report,
    # so they never move the revision a claim compares.
    for _ in range(3):
        await store.refresh_lease(lease)
    guard = placement.NodeGuard()
    assert await _claim(store, guard, view, 4) == 1
    assert guard.learned == []
    usage = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert usage.value.used.vcpus == 4


async def test_a_claim_on_stale_settings_is_judged_on_the_fresh_ones(store: Store) -> None:
    await _put_report(store, _report(8), await store.grant_lease(30))
    await store.create(keys.node_settings("n1"), scheduler_pb2.NodeSettings(name="n1"))
    await store.create(keys.node_usage("n1"), _usage(5))
    view = await _view(store, "n1")
    assert view.usable[0] == 8 * 16

    def one_to_one(current: scheduler_pb2.NodeSettings) -> scheduler_pb2.NodeSettings:
        current.allocation_ratios.cpu = 1.0
        return current

    fresh = await store.update(keys.node_settings("n1"), scheduler_pb2.NodeSettings, one_to_one)
    guard = placement.NodeGuard()
    assert await _claim(store, guard, view, 3) == 2  # 5 + 3 fits the fresh 8
    assert [learned.settings.mod_revision for learned in guard.learned
            if learned.settings is not None] == [fresh.mod_revision]
    with pytest.raises(placement._Stale):
        await _claim(store, placement.NodeGuard(), view, 1)
    usage = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert usage.value.used.vcpus == 8


@pytest.mark.parametrize("change", ["disable", "shrink", "lose"])
async def test_a_node_taken_out_or_shrunk_since_the_decision_refuses_the_claim(
    store: Store, change: str
) -> None:
    lease = await store.grant_lease(30)
    await _put_report(store, _report(8), lease)
    settings = await store.create(keys.node_settings("n1"), scheduler_pb2.NodeSettings(name="n1"))
    view = await _view(store, "n1")
    if change == "disable":
        await store.replace(keys.node_settings("n1"),
                            scheduler_pb2.NodeSettings(name="n1", disabled=True),
                            expect_revision=settings.mod_revision)
    elif change == "shrink":
        await _put_report(store, _report(1), lease)  # 16 vCPUs usable now
    else:
        await store.revoke_lease(lease)
    with pytest.raises(placement._Stale):
        await _claim(store, placement.NodeGuard(), view, 17)
    assert await store.find(keys.node_usage("n1"), scheduler_pb2.NodeUsage) is None
