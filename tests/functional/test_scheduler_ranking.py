"""The node cache's weight order follows etcd: after watched changes it matches a full weigh."""

from __future__ import annotations

import asyncio
import contextlib
import random

from google.protobuf.message import Message
from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import SchedulerSettings
from services.common.store import Store, Txn
from services.scheduler import cache as cache_module
from services.scheduler import filters, keys, model, weighers
from tests.functional import scheduler_harness as harness

DEMAND = filters.Demand(resources=(1, 512, 1))


def top_weights(node_cache: cache_module.NodeCache, chosen: SchedulerSettings) -> list[float]:
    everything = node_cache.views()
    passed = filters.run(everything, DEMAND).passed
    weights = weighers.weigh(passed, DEMAND, chosen, weighers.scale_of(everything))
    return sorted(weights, reverse=True)[:chosen.host_subset_size]


def walked_weights(node_cache: cache_module.NodeCache, chosen: SchedulerSettings) -> list[float]:
    walked = node_cache.ranking.walk(DEMAND, chosen.host_subset_size)
    weights = weighers.coefficients(node_cache.ranking.scale, chosen)
    return [weighers.resource_weight(view.free, weights) for view in walked.passed]


async def write(store: Store, key: str, value: Message | None) -> None:
    """Put `value` at `key` (None: delete it), unconditionally."""
    async def body(txn: Txn) -> None:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)

    await store.atomic(body)


async def test_the_order_follows_usage_settings_and_reports_from_the_watch(
    store: Store,
) -> None:
    chosen = SchedulerSettings(host_subset_size=4)
    names = [f"rank-{index:02d}" for index in range(30)]
    for index, name in enumerate(names):
        await harness.put_node(store, harness.report(name, vcpus=4 + index % 3))
    node_cache = cache_module.NodeCache(store, chosen, random.Random(5))
    informer = asyncio.create_task(node_cache.run())
    try:
        await asyncio.wait_for(node_cache.synced.wait(), 10)
        assert walked_weights(node_cache, chosen) == top_weights(node_cache, chosen)
        rng = random.Random(11)
        for name in rng.sample(names, 12):
            used = model.to_resources((rng.randrange(60), rng.randrange(20000), rng.randrange(90)))
            await write(store, keys.node_usage(name), scheduler_pb2.NodeUsage(name=name, used=used))
        # A disabled node, a bigger node (a new scale for every weight), one gone.
        await write(store, keys.node_settings(names[0]),
                    scheduler_pb2.NodeSettings(name=names[0], disabled=True))
        await harness.put_node(store, harness.report(names[1], vcpus=64, memory_mb=65536))
        await write(store, keys.node_report(names[2]), None)
        await write(store, keys.node_usage("marker"), scheduler_pb2.NodeUsage(name="marker"))

        async def delivered() -> bool:
            return node_cache.usage("marker") is not None

        await harness.wait_for(delivered)
        assert node_cache.ranking.scale == (64 * 16, int(65536 * 1.5), 100)
        assert walked_weights(node_cache, chosen) == top_weights(node_cache, chosen)
        walked = node_cache.ranking.walk(DEMAND, chosen.host_subset_size).passed
        assert walked[0].name == names[1]
        assert names[0] not in {view.name for view in walked}
    finally:
        informer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await informer
