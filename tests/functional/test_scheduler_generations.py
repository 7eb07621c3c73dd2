"""Claims compare the capacity they were decided on, like Placement generations.

Replica "stale" lists the nodes once and then hears nothing more (its informer
is stopped after the first listing), so it decides on settings and reports
another replica or an agent has since changed. Its claims must still never
over-commit a node under the new settings, nor land on a node that was
disabled or went DOWN before the claim started.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.common.store import Store
from services.scheduler import keys, model
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

FLAVOR = scheduler_pb2.Resources(vcpus=4, memory_mb=512, disk_gb=1)


@dataclass
class Pair:
    """A current replica (its informer runs) and a stale one, on the same etcd."""

    current: harness.Replica
    stale: harness.Replica


StartPair = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def start_pair(
    etcd: EtcdEndpoint, key_prefix: str, store: Store
) -> AsyncIterator[StartPair]:
    started: list[Pair] = []

    async def _start(*reports: scheduler_pb2.NodeReport, **scheduling: object) -> Pair:
        for node in reports:
            await harness.put_node(store, node)
        settings = harness.settings_for(etcd.endpoint, key_prefix, **scheduling)
        current = await harness.start_replica(settings)

        async def registered() -> bool:
            return all(current.cache.settings(node.name) is not None for node in reports)

        # The stale replica lists nodes already registered, as in steady state.
        await harness.wait_for(registered)
        stale_store, stale_cache = await harness.frozen_cache(settings)
        pair = Pair(current, await harness.serve(stale_store, stale_cache, settings, seed=7))
        started.append(pair)
        return pair

    yield _start
    for pair in started:
        await pair.stale.stop()
        await pair.current.stop()


def request(resources: scheduler_pb2.Resources = FLAVOR) -> (
    scheduler_pb2.SelectDestinationsRequest
):
    return scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
        resources=resources, count=1, consumer_ids=[str(uuid.uuid4())]))


async def claim(stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub) -> tuple[
    grpc.StatusCode, str
]:
    """Claim one FLAVOR; the status and the node chosen ("" on failure)."""
    try:
        reply = await stub.SelectDestinations(request())
    except grpc.aio.AioRpcError as exc:
        return exc.code(), ""
    return grpc.StatusCode.OK, reply.destinations[0].node_name


async def allocated_vcpus(store: Store, node_name: str) -> int:
    records, _ = await store.list_all(keys.ALLOCATIONS, scheduler_pb2.ConsumerAllocations)
    return sum(allocation.resources.vcpus for record in records
               for allocation in record.value.allocations if allocation.node_name == node_name)


async def usable_now(store: Store, node_name: str) -> model.Amounts:
    """The node's usable capacity computed from what etcd holds now."""
    report = await store.get(keys.node_report(node_name), scheduler_pb2.NodeReport)
    settings = await store.get(keys.node_settings(node_name), scheduler_pb2.NodeSettings)
    record = await store.find(keys.default_ratios(), scheduler_pb2.DefaultAllocationRatios)
    return model.usable_capacity(report.value.capacity, settings.value,
                                 model.default_ratios(record.value if record else None))


def update(name: str, paths: list[str], **settings: object) -> scheduler_pb2.UpdateNodeRequest:
    return scheduler_pb2.UpdateNodeRequest(
        name=name, settings=scheduler_pb2.NodeSettings(**settings),  # type: ignore[arg-type]
        update_mask=field_mask_pb2.FieldMask(paths=paths))


async def lower_cpu_ratio(pair: Pair, store: Store) -> None:
    await pair.current.stub.UpdateNode(update(
        "n1", ["allocation_ratios.cpu"],
        allocation_ratios=scheduler_pb2.AllocationRatios(cpu=1.0)))


async def raise_reserved(pair: Pair, store: Store) -> None:
    await pair.current.stub.UpdateNode(update(
        "n1", ["reserved"], reserved=scheduler_pb2.Resources(vcpus=7)))


async def shrink_report(pair: Pair, store: Store) -> None:
    # The agent restarted on a smaller host: its report is all that changes.
    await harness.put_node(store, harness.report("n1", vcpus=2))


# The change, and the vCPUs n1 may hold afterwards: (8 - reserved) x ratio.
CAPACITY_CHANGES = [
    pytest.param(lower_cpu_ratio, 8, id="cpu-ratio-lowered"),
    pytest.param(raise_reserved, (8 - 7) * 16, id="reserved-raised"),
    pytest.param(shrink_report, 2 * 16, id="report-shrunk"),
]


@pytest.mark.parametrize(("change", "usable_vcpus"), CAPACITY_CHANGES)
async def test_a_stale_replica_never_overcommits_under_new_capacity(
    store: Store, start_pair: StartPair,
    change: Callable[[Pair, Store], Awaitable[None]], usable_vcpus: int,
) -> None:
    pair = await start_pair(harness.report("n1"))
    assert await claim(pair.stale.stub) == (grpc.StatusCode.OK, "n1")
    await change(pair, store)
    outcomes = [await claim(pair.stale.stub) for _ in range(10)]
    fits = usable_vcpus // FLAVOR.vcpus - 1
    assert outcomes == ([(grpc.StatusCode.OK, "n1")] * fits
                        + [(grpc.StatusCode.RESOURCE_EXHAUSTED, "")] * (10 - fits))
    usage = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    held = await allocated_vcpus(store, "n1")
    assert usage.value.used.vcpus == held == (fits + 1) * FLAVOR.vcpus
    assert held <= (await usable_now(store, "n1"))[0] == usable_vcpus


async def disable_n1(pair: Pair, store: Store) -> None:
    await pair.current.stub.UpdateNode(update(
        "n1", ["disabled", "disabled_reason"], disabled=True, disabled_reason="maintenance"))


async def lose_n1(pair: Pair, store: Store) -> None:
    # What the agent's lease lapsing does to its report.
    await store.delete(keys.node_report("n1"))


@pytest.mark.parametrize("change", [
    pytest.param(disable_n1, id="disabled"), pytest.param(lose_n1, id="down")])
async def test_a_stale_replica_never_picks_a_node_taken_out_before_the_claim(
    store: Store, start_pair: StartPair, change: Callable[[Pair, Store], Awaitable[None]],
) -> None:
    # n1 is by far the emptiest: spreading over the best one always picks it
    # while it is in the running.
    big = harness.report("n1", vcpus=64, memory_mb=262144, disk_gb=1000)
    pair = await start_pair(big, harness.report("n2"), host_subset_size=1)
    assert await claim(pair.stale.stub) == (grpc.StatusCode.OK, "n1")
    await change(pair, store)
    outcomes = [await claim(pair.stale.stub) for _ in range(5)]
    assert outcomes == [(grpc.StatusCode.OK, "n2")] * 5
    assert await allocated_vcpus(store, "n1") == FLAVOR.vcpus
    # The lost compare taught the stale cache what its watch never delivered.
    view = pair.stale.cache.view("n1")
    assert view is not None and not (view.enabled and view.up)


async def test_a_stale_replica_never_moves_onto_a_node_disabled_before_the_move(
    store: Store, start_pair: StartPair,
) -> None:
    pair = await start_pair(harness.report("n1"), harness.report("n2"))
    claimed = request()
    reply = await pair.stale.stub.SelectDestinations(claimed)
    target = {"n1": "n2", "n2": "n1"}[reply.destinations[0].node_name]
    await pair.current.stub.UpdateNode(update(target, ["disabled"], disabled=True))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await pair.stale.stub.MoveAllocations(scheduler_pb2.MoveAllocationsRequest(
            consumer_id=claimed.spec.consumer_ids[0], target_node=target))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await allocated_vcpus(store, target) == 0
