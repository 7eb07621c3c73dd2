"""The scheduler's claim metrics: lost races are counted and served on /metrics."""

from __future__ import annotations

import asyncio
import random
import urllib.request
import uuid

import prometheus_client
from nubis.scheduler.v1 import scheduler_pb2

from services.common import server
from services.common.settings import ServiceEndpoint
from services.common.store import Store
from services.scheduler import main, metrics, placement
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

FLAVOR = scheduler_pb2.Resources(vcpus=1, memory_mb=512, disk_gb=1)


def spec() -> scheduler_pb2.RequestSpec:
    return scheduler_pb2.RequestSpec(resources=FLAVOR, consumer_ids=[str(uuid.uuid4())])


async def test_a_claim_that_lost_its_compare_counts_one_conflict(
    etcd: EtcdEndpoint, key_prefix: str, store: Store
) -> None:
    await harness.put_node(store, harness.report("n1"))
    settings = harness.settings_for(etcd.endpoint, key_prefix)
    current = await harness.start_replica(settings)
    stale_store, stale_cache = None, None
    try:
        async def registered() -> bool:
            return current.cache.settings("n1") is not None

        await harness.wait_for(registered)
        stale_store, stale_cache = await harness.frozen_cache(settings)
        claim_metrics = metrics.ClaimMetrics()
        registry = prometheus_client.CollectorRegistry()
        claim_metrics.register(registry)
        places = placement.Placement(stale_store, stale_cache, settings.scheduling,
                                     random.Random(1), claim_metrics)
        # Unconflicted: the frozen cache still holds n1's current usage.
        await places.select_destinations(spec(), "p1")
        assert registry.get_sample_value("nubis_scheduler_claim_conflicts_total") == 0
        # Another replica moves n1's usage past what the frozen cache knows.
        await current.stub.SelectDestinations(
            scheduler_pb2.SelectDestinationsRequest(spec=spec()))
        await places.select_destinations(spec(), "p1")
        assert registry.get_sample_value("nubis_scheduler_claim_conflicts_total") == 1
        assert registry.get_sample_value("nubis_scheduler_claims_total") == 2
    finally:
        if stale_store is not None:
            await stale_store.close()
        await current.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_the_scheduler_serves_its_claim_counters_on_its_metrics_port(
    etcd: EtcdEndpoint, key_prefix: str, store: Store
) -> None:
    settings = harness.settings_for(etcd.endpoint, key_prefix)
    parts = await main.build(store, settings)
    running = await server.start(ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=0),
                                 parts.registrations, settings=settings)
    tasks = server.start_background(parts, running)
    try:
        assert running.metrics_port is not None
        text = ""
        for _ in range(50):
            text = await asyncio.to_thread(scrape, running.metrics_port)
            if "nubis_scheduler_claim_conflicts_total" in text:
                break
            await asyncio.sleep(0.1)
        assert "nubis_scheduler_claim_conflicts_total 0.0" in text
        assert "nubis_scheduler_claims_total 0.0" in text
    finally:
        await running.stop(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for callback in parts.on_stop:
            await callback()
