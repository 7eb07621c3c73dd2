"""Capacity rules every replica agrees on: the cloud's default ratios, and reserved amounts.

The default allocation ratios are one record in etcd, seeded by the first
replica from its settings: a replica started from another configuration file
computes the same capacity, a change reaches every replica, and a replica
whose cache missed the change cannot claim on the old figures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import rpc_errors
from services.common.store import Store
from services.scheduler import keys
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness
from tests.functional import test_scheduler_contention as contention

Start = harness.Start
P = scheduler_pb2
HOT = contention.HOT


@pytest.fixture
async def start(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[Start]:
    async with harness.replica_starter(etcd.endpoint, key_prefix) as start_replica:
        yield start_replica


async def node_of(replica: harness.Replica, name: str = HOT.name) -> P.Node:
    return await replica.stub.GetNode(P.GetNodeRequest(name=name))


def set_defaults(revision: int = 0, **values: float) -> P.UpdateDefaultAllocationRatiosRequest:
    record = P.DefaultAllocationRatios(ratios=P.AllocationRatios(**values), revision=revision)
    return P.UpdateDefaultAllocationRatiosRequest(
        default_allocation_ratios=record,
        update_mask=field_mask_pb2.FieldMask(paths=[f"ratios.{name}" for name in values]))


def violations(exc: grpc.aio.AioRpcError) -> set[str]:
    error = rpc_errors.domain_error(exc, "scheduler")
    return {violation.field for violation in getattr(error, "violations", [])}


@pytest.mark.slow
async def test_replicas_with_other_default_ratios_agree_and_fill_exactly(
    store: Store, start: Start
) -> None:
    """The second replica's settings say cpu 32.0: it still computes 16 x 16 vCPUs."""
    await harness.put_node(store, HOT)
    first = await start(cpu_allocation_ratio=16.0)
    second = await start(cpu_allocation_ratio=32.0, ram_allocation_ratio=3.0)
    for replica in (first, second):
        await contention.sees_node(replica, HOT.name)
    shown = [await node_of(replica) for replica in (first, second)]
    assert [node.free.vcpus for node in shown] == [contention.FITS] * 2
    assert shown[0].allocation_ratios == shown[1].allocation_ratios
    assert shown[1].allocation_ratios.cpu == 16.0 and shown[1].allocation_ratios.ram == 1.5
    defaults = await second.stub.GetDefaultAllocationRatios(P.GetDefaultAllocationRatiosRequest())
    assert (defaults.ratios.cpu, defaults.ratios.ram, defaults.ratios.disk) == (16.0, 1.5, 1.0)
    assert defaults.revision > 0

    codes, details = await contention.race([first, second], 300)
    assert codes == {grpc.StatusCode.OK: contention.FITS,
                     grpc.StatusCode.RESOURCE_EXHAUSTED: 300 - contention.FITS}, details[:3]
    assert await contention.filled(store, HOT.name) == (contention.FITS, contention.FITS)


async def test_replicas_starting_together_seed_one_record(
    etcd: EtcdEndpoint, key_prefix: str, store: Store, start: Start
) -> None:
    await harness.put_node(store, HOT)
    replicas = await asyncio.gather(start(cpu_allocation_ratio=2.0),
                                    start(cpu_allocation_ratio=3.0))
    for replica in replicas:
        await contention.sees_node(replica, HOT.name)
    stored = await store.get(keys.default_ratios(), P.DefaultAllocationRatios)
    assert stored.value.ratios.cpu in (2.0, 3.0)
    assert stored.create_revision == stored.mod_revision  # written once, never overwritten
    for replica in replicas:
        assert (await node_of(replica)).free.vcpus == 16 * stored.value.ratios.cpu


async def test_a_change_reaches_every_replica_and_a_stale_one_cannot_claim_on_old_figures(
    etcd: EtcdEndpoint, key_prefix: str, store: Store, start: Start
) -> None:
    await harness.put_node(store, HOT)
    live = await start()
    await contention.sees_node(live, HOT.name)
    # A replica that heard its last news before the change.
    frozen_store, frozen_cache = await harness.frozen_cache(
        harness.settings_for(etcd.endpoint, key_prefix))
    stale = await harness.serve(frozen_store, frozen_cache,
                                harness.settings_for(etcd.endpoint, key_prefix))
    try:
        changed = await live.stub.UpdateDefaultAllocationRatios(set_defaults(cpu=1.0))
        assert changed.ratios.cpu == 1.0 and changed.ratios.ram == 1.5
        assert (await node_of(live)).free.vcpus == 16
        assert (await node_of(stale)).free.vcpus == contention.FITS  # it has not heard

        codes, details = await contention.race([stale], 20)
        assert codes == {grpc.StatusCode.OK: 16, grpc.StatusCode.RESOURCE_EXHAUSTED: 4}, details
        assert await contention.filled(store, HOT.name) == (16, 16)
        # Its first claim read the new record and taught its cache.
        assert (await node_of(stale)).allocation_ratios.cpu == 1.0
    finally:
        await stale.stop()


async def test_a_node_ratio_wins_over_the_defaults(store: Store, start: Start) -> None:
    await harness.put_node(store, HOT)
    replica = await start()
    await contention.sees_node(replica, HOT.name)
    mask = field_mask_pb2.FieldMask(paths=["allocation_ratios.cpu"])
    own = P.NodeSettings(allocation_ratios=P.AllocationRatios(cpu=2.0))
    await replica.stub.UpdateNode(P.UpdateNodeRequest(name=HOT.name, settings=own,
                                                      update_mask=mask))
    await replica.stub.UpdateDefaultAllocationRatios(set_defaults(cpu=8.0, ram=1.0))
    node = await node_of(replica)
    assert (node.allocation_ratios.cpu, node.allocation_ratios.ram) == (2.0, 1.0)
    assert node.free.vcpus == 32 and node.free.memory_mb == HOT.capacity.memory_mb
    # Unset again: back to the cloud's default.
    await replica.stub.UpdateNode(P.UpdateNodeRequest(
        name=HOT.name, settings=P.NodeSettings(), update_mask=mask))
    assert (await node_of(replica)).free.vcpus == 16 * 8


async def test_updating_the_defaults_checks_its_input_and_revision(
    store: Store, start: Start
) -> None:
    replica = await start()
    current = await replica.stub.GetDefaultAllocationRatios(P.GetDefaultAllocationRatiosRequest())
    bad = {
        "out of range": (set_defaults(cpu=0.0, disk=1001.0),
                         {"default_allocation_ratios.ratios.cpu",
                          "default_allocation_ratios.ratios.disk"}),
        "no value": (P.UpdateDefaultAllocationRatiosRequest(
            update_mask=field_mask_pb2.FieldMask(paths=["ratios"])),
            {f"default_allocation_ratios.ratios.{name}" for name in ("cpu", "ram", "disk")}),
        "unknown path": (P.UpdateDefaultAllocationRatiosRequest(
            update_mask=field_mask_pb2.FieldMask(paths=["revision"])), {"update_mask"}),
        "empty mask": (P.UpdateDefaultAllocationRatiosRequest(), {"update_mask"}),
    }
    for case, (request, fields) in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await replica.stub.UpdateDefaultAllocationRatios(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert violations(refused.value) == fields, case
    changed = await replica.stub.UpdateDefaultAllocationRatios(
        set_defaults(current.revision, disk=2.0))
    assert changed.ratios.disk == 2.0 and changed.revision > current.revision
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await replica.stub.UpdateDefaultAllocationRatios(set_defaults(current.revision, disk=3.0))
    assert stale.value.code() == grpc.StatusCode.ABORTED
    unchanged = await replica.stub.GetDefaultAllocationRatios(P.GetDefaultAllocationRatiosRequest())
    assert unchanged.ratios.disk == 2.0


async def test_reserved_above_the_capacity_is_invalid_argument(
    store: Store, start: Start
) -> None:
    """9999 vCPUs reserved on a 16-vCPU node: refused, as Placement refuses it."""
    await harness.put_node(store, HOT)
    replica = await start()
    await contention.sees_node(replica, HOT.name)
    mask = field_mask_pb2.FieldMask(paths=["reserved"])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.UpdateNode(P.UpdateNodeRequest(
            name=HOT.name, settings=P.NodeSettings(reserved=P.Resources(
                vcpus=9999, memory_mb=HOT.capacity.memory_mb + 1)), update_mask=mask))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(refused.value) == {"settings.reserved.vcpus", "settings.reserved.memory_mb"}
    assert (await node_of(replica)).free.vcpus == contention.FITS
    # All of it reserved is allowed (a node kept for the host alone).
    everything = await replica.stub.UpdateNode(P.UpdateNodeRequest(
        name=HOT.name, settings=P.NodeSettings(reserved=P.Resources(vcpus=16)),
        update_mask=mask))
    assert everything.free.vcpus == 0
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await replica.stub.SelectDestinations(contention.claim_of(str(uuid.uuid4())))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
