"""Claims under contention: a hot node fills exactly, losers re-plan, retries find their claim.

Every claim of these tests aims at one node (the hot spot), from 8 clients
spread over 2 replicas: every commit but one per round loses its compare.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from nubis.scheduler.v1 import scheduler_pb2

from services.common.store import Store
from services.scheduler import keys
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

Start = harness.Start
FLAVOR = scheduler_pb2.Resources(vcpus=1, memory_mb=64, disk_gb=1)
# 16 vCPUs x the default ratio of 16.0 = 256 instances of FLAVOR; vCPUs bind.
HOT = harness.report("hot", vcpus=16, memory_mb=65536, disk_gb=1000)
FITS = 256
CLIENTS = 8


@pytest.fixture
async def start(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[Start]:
    async with harness.replica_starter(etcd.endpoint, key_prefix) as start_replica:
        yield start_replica


def claim_of(consumer: str) -> scheduler_pb2.SelectDestinationsRequest:
    return scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
        resources=FLAVOR, consumer_ids=[consumer]))


async def sees_node(replica: harness.Replica, name: str) -> None:
    async def ready() -> bool:
        view = replica.cache.view(name)
        return view is not None and view.up
    await harness.wait_for(ready)


async def race(
    replicas: list[harness.Replica], claims: int
) -> tuple[dict[grpc.StatusCode, int], list[str]]:
    """`claims` claims by CLIENTS clients, each on a replica in turn: codes counted, and
    the message of each failure other than RESOURCE_EXHAUSTED."""
    queue = [str(uuid.uuid4()) for _ in range(claims)]
    codes: dict[grpc.StatusCode, int] = {}
    details: list[str] = []

    async def client(index: int) -> None:
        stub = replicas[index % len(replicas)].stub
        while queue:
            consumer = queue.pop()
            try:
                await stub.SelectDestinations(claim_of(consumer))
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    details.append(exc.details() or "")
            codes[code] = codes.get(code, 0) + 1

    await asyncio.gather(*(client(index) for index in range(CLIENTS)))
    return codes, details


async def filled(store: Store, name: str) -> tuple[int, int]:
    usage = await store.get(keys.node_usage(name), scheduler_pb2.NodeUsage)
    records, _ = await store.list_all(keys.ALLOCATIONS, scheduler_pb2.ConsumerAllocations)
    return usage.value.used.vcpus, len(records)


@pytest.mark.slow
async def test_a_hot_node_fills_exactly_and_no_claim_is_aborted(
    store: Store, start: Start
) -> None:
    """300 claims, 8 clients, 2 replicas, room for 256: 256 OK, 44 RESOURCE_EXHAUSTED, no other."""
    await harness.put_node(store, HOT)
    replicas = [await start(), await start()]
    for replica in replicas:
        await sees_node(replica, HOT.name)
    codes, details = await race(replicas, 300)
    assert codes == {grpc.StatusCode.OK: FITS,
                     grpc.StatusCode.RESOURCE_EXHAUSTED: 300 - FITS}, details[:3]
    assert await filled(store, HOT.name) == (FITS, FITS)


@pytest.mark.slow
async def test_releases_racing_on_a_hot_node_all_succeed(store: Store, start: Start) -> None:
    """Every instance of a full node deleted at once: no release is ABORTED."""
    await harness.put_node(store, HOT)
    replicas = [await start(), await start()]
    for replica in replicas:
        await sees_node(replica, HOT.name)
    codes, details = await race(replicas, FITS)
    assert codes == {grpc.StatusCode.OK: FITS}, details[:3]
    records, _ = await store.list_all(keys.ALLOCATIONS, scheduler_pb2.ConsumerAllocations)
    queue = [record.value.consumer_id for record in records]
    failures: list[str] = []

    async def client(index: int) -> None:
        stub = replicas[index % len(replicas)].stub
        while queue:
            request = scheduler_pb2.ReleaseAllocationsRequest(consumer_id=queue.pop())
            try:
                await stub.ReleaseAllocations(request)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    await asyncio.gather(*(client(index) for index in range(CLIENTS)))
    assert failures == []
    assert await filled(store, HOT.name) == (0, 0)


async def test_a_retried_claim_on_the_now_full_node_returns_its_first_destination(
    store: Store, start: Start
) -> None:
    """A caller that lost the reply retries (on another replica): its claim filled the node."""
    await harness.put_node(store, harness.report("small", vcpus=1))  # 16 vCPUs usable
    replicas = [await start(), await start()]
    for replica in replicas:
        await sees_node(replica, "small")
    whole = scheduler_pb2.RequestSpec(resources=scheduler_pb2.Resources(vcpus=16, memory_mb=64),
                                      consumer_ids=[str(uuid.uuid4())])
    first = await replicas[0].stub.SelectDestinations(
        scheduler_pb2.SelectDestinationsRequest(spec=whole))
    for replica in (*replicas, replicas[0]):
        again = await replica.stub.SelectDestinations(
            scheduler_pb2.SelectDestinationsRequest(spec=whole))
        assert list(again.destinations) == list(first.destinations)
    assert await filled(store, "small") == (16, 1)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await replicas[1].stub.SelectDestinations(claim_of(str(uuid.uuid4())))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Asking a full node for something else than what the consumer holds is no retry.
    other = scheduler_pb2.RequestSpec(resources=FLAVOR, consumer_ids=whole.consumer_ids)
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await replicas[1].stub.SelectDestinations(
            scheduler_pb2.SelectDestinationsRequest(spec=other))
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
