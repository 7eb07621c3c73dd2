"""The claim transaction trusts the informer's usage copy only as far as etcd confirms it."""

from __future__ import annotations

from nubis.scheduler.v1 import scheduler_pb2

from services.common.store import Store, Txn
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
