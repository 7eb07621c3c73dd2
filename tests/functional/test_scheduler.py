"""SchedulerService end to end: real replicas, real etcd, nodes written as agents write them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common.store import Store
from services.scheduler import keys
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

Start = harness.Start
SMALL = scheduler_pb2.Resources(vcpus=1, memory_mb=512, disk_gb=10)


@pytest.fixture
async def start(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[Start]:
    async with harness.replica_starter(etcd.endpoint, key_prefix) as start_replica:
        yield start_replica


async def nodes_seen(replica: harness.Replica, count: int) -> None:
    async def ready() -> bool:
        return sum(1 for view in replica.cache.views() if view.up) >= count
    await harness.wait_for(ready)


def spec(*consumers: str, resources: scheduler_pb2.Resources = SMALL,
         **fields: object) -> scheduler_pb2.SelectDestinationsRequest:
    return scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
        resources=resources, count=len(consumers), consumer_ids=consumers,
        **fields,  # type: ignore[arg-type]
    ))


def new_id() -> str:
    return str(uuid.uuid4())


async def test_claim_then_release_restores_usage(store: Store, start: Start) -> None:
    await harness.put_node(store, harness.report("n1"))
    replica = await start()
    await nodes_seen(replica, 1)
    consumer = new_id()
    reply = await replica.stub.SelectDestinations(spec(consumer))
    assert [(d.consumer_id, d.node_name, d.queue) for d in reply.destinations] == [
        (consumer, "n1", "node.n1")]
    held = await replica.stub.GetAllocations(
        scheduler_pb2.GetAllocationsRequest(consumer_id=consumer))
    assert held.allocations[0].node_name == "n1"
    assert held.allocations[0].resources == SMALL
    node = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name="n1"))
    assert (node.used.vcpus, node.used.memory_mb, node.allocation_count) == (1, 512, 1)
    assert node.free.vcpus == 8 * 16 - 1 and node.state == scheduler_pb2.NODE_STATE_UP
    await replica.stub.ReleaseAllocations(
        scheduler_pb2.ReleaseAllocationsRequest(consumer_id=consumer))
    usage = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert usage.value.used == scheduler_pb2.Resources() and usage.value.allocation_count == 0
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await replica.stub.GetAllocations(
            scheduler_pb2.GetAllocationsRequest(consumer_id=consumer))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
async def test_fifty_racing_claims_on_two_replicas_fill_exactly_twenty(
    store: Store, start: Start
) -> None:
    # Disk is the binding resource: 4 nodes x 50 GB / 10 GB = exactly 20 instances.
    for index in range(4):
        await harness.put_node(store, harness.report(f"n{index}", disk_gb=50))
    replicas = [await start(), await start()]
    for replica in replicas:
        await nodes_seen(replica, 4)
    consumers = [new_id() for _ in range(50)]

    async def claim(index: int) -> grpc.StatusCode:
        stub = replicas[index % 2].stub
        try:
            await stub.SelectDestinations(spec(consumers[index]))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(claim(index) for index in range(50)))
    assert codes.count(grpc.StatusCode.OK) == 20
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30
    records, _ = await store.list_all(keys.ALLOCATIONS, scheduler_pb2.ConsumerAllocations)
    assert len(records) == 20
    per_node: dict[str, int] = {}
    for record in records:
        for allocation in record.value.allocations:
            per_node[allocation.node_name] = (
                per_node.get(allocation.node_name, 0) + allocation.resources.disk_gb)
    for index in range(4):
        usage = await store.get(keys.node_usage(f"n{index}"), scheduler_pb2.NodeUsage)
        # capacity x ratio - reserved = 50 x 1.0 - 0
        assert usage.value.used.disk_gb == per_node[f"n{index}"] <= 50


async def test_no_valid_node_says_what_each_filter_removed(store: Store, start: Start) -> None:
    await harness.put_node(store, harness.report("big", traits=("CUSTOM_SSD",)))
    await harness.put_node(store, harness.report("tiny", vcpus=1, memory_mb=256, disk_gb=5))
    await harness.put_node(store, harness.report("far", zone="az2"))
    replica = await start()
    await nodes_seen(replica, 3)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await replica.stub.SelectDestinations(spec(
            new_id(), availability_zone="nova", forbidden_traits=["CUSTOM_SSD"]))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = failed.value.details() or ""
    assert "3 nodes considered" in details
    assert "AvailabilityZoneFilter removed 1" in details
    assert "TraitsFilter removed 1" in details
    assert "CapacityFilter removed 1" in details


async def test_anti_affinity_spreads_three_and_refuses_a_fourth(
    store: Store, start: Start
) -> None:
    for name in ("a", "b", "c"):
        await harness.put_node(store, harness.report(name))
    replica = await start()
    await nodes_seen(replica, 3)
    group = await replica.stub.CreateServerGroup(scheduler_pb2.CreateServerGroupRequest(
        server_group=scheduler_pb2.ServerGroup(
            meta=resource_pb2.ResourceMeta(name="web"),
            policy=scheduler_pb2.ANTI_AFFINITY)))
    members = [new_id() for _ in range(3)]
    placed = await asyncio.gather(*(
        replica.stub.SelectDestinations(spec(member, server_group_id=group.meta.id))
        for member in members))
    assert sorted(reply.destinations[0].node_name for reply in placed) == ["a", "b", "c"]
    with pytest.raises(grpc.aio.AioRpcError) as fourth:
        await replica.stub.SelectDestinations(spec(new_id(), server_group_id=group.meta.id))
    assert fourth.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ServerGroupAntiAffinityFilter removed 3" in (fourth.value.details() or "")
    fetched = await replica.stub.GetServerGroup(
        scheduler_pb2.GetServerGroupRequest(id=group.meta.id))
    assert sorted(fetched.member_nodes) == sorted(members)


async def test_affinity_keeps_a_multi_instance_request_together(
    store: Store, start: Start
) -> None:
    for name in ("a", "b", "c"):
        await harness.put_node(store, harness.report(name))
    replica = await start()
    await nodes_seen(replica, 3)
    group = await replica.stub.CreateServerGroup(scheduler_pb2.CreateServerGroupRequest(
        server_group=scheduler_pb2.ServerGroup(
            meta=resource_pb2.ResourceMeta(name="db"), policy=scheduler_pb2.AFFINITY)))
    reply = await replica.stub.SelectDestinations(
        spec(new_id(), new_id(), new_id(), server_group_id=group.meta.id))
    assert len({d.node_name for d in reply.destinations}) == 1
    later = await replica.stub.SelectDestinations(spec(new_id(), server_group_id=group.meta.id))
    assert later.destinations[0].node_name == reply.destinations[0].node_name


async def test_disable_reserve_and_ratio_change_what_fits(store: Store, start: Start) -> None:
    await harness.put_node(store, harness.report("n1", vcpus=4))
    await harness.put_node(store, harness.report("n2", vcpus=4))
    replica = await start()
    await nodes_seen(replica, 2)
    disabled = await replica.stub.UpdateNode(scheduler_pb2.UpdateNodeRequest(
        name="n1", settings=scheduler_pb2.NodeSettings(disabled=True, disabled_reason="repair"),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled", "disabled_reason"])))
    assert disabled.disabled and disabled.disabled_reason == "repair"
    for _ in range(3):
        reply = await replica.stub.SelectDestinations(spec(new_id()))
        assert reply.destinations[0].node_name == "n2"
    settings = scheduler_pb2.NodeSettings(reserved=scheduler_pb2.Resources(vcpus=1))
    settings.allocation_ratios.cpu = 1.0
    changed = await replica.stub.UpdateNode(scheduler_pb2.UpdateNodeRequest(
        name="n2", settings=settings,
        update_mask=field_mask_pb2.FieldMask(paths=["reserved", "allocation_ratios.cpu"])))
    assert changed.allocation_ratios.cpu == 1.0 and changed.allocation_ratios.ram == 1.5
    assert changed.free.vcpus == 0  # (4 - 1) x 1.0 - 3 used
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await replica.stub.SelectDestinations(spec(new_id()))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await replica.stub.UpdateNode(scheduler_pb2.UpdateNodeRequest(
        name="n1", settings=scheduler_pb2.NodeSettings(disabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled"])))
    reply = await replica.stub.SelectDestinations(spec(new_id()))
    assert reply.destinations[0].node_name == "n1"
    listed = await replica.stub.ListNodes(scheduler_pb2.ListNodesRequest(page_size=1))
    assert [n.name for n in listed.nodes] == ["n1"] and listed.next_page_token
    rest = await replica.stub.ListNodes(
        scheduler_pb2.ListNodesRequest(page_token=listed.next_page_token))
    assert [n.name for n in rest.nodes] == ["n2"] and not rest.next_page_token


async def test_node_whose_lease_lapses_is_down_and_never_chosen(
    store: Store, start: Start
) -> None:
    lease = await store.grant_lease(2)
    await harness.put_node(store, harness.report("leased", vcpus=64), lease)
    await harness.put_node(store, harness.report("steady", vcpus=2))
    replica = await start()
    await nodes_seen(replica, 2)

    async def registered() -> bool:
        node = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name="leased"))
        return bool(node.id)
    await harness.wait_for(registered)
    first = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name="leased"))

    async def down() -> bool:
        node = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name="leased"))
        return node.state == scheduler_pb2.NODE_STATE_DOWN
    await harness.wait_for(down, within=6)
    after = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name="leased"))
    assert after.id == first.id and after.capacity.vcpus == 64
    for _ in range(3):
        reply = await replica.stub.SelectDestinations(spec(new_id()))
        assert reply.destinations[0].node_name == "steady"


async def test_move_claims_target_then_release_frees_source(store: Store, start: Start) -> None:
    for name in ("src", "dst"):
        await harness.put_node(store, harness.report(name))
    replica = await start()
    await nodes_seen(replica, 2)
    consumer = new_id()
    await replica.stub.SelectDestinations(spec(consumer, avoid_nodes=["dst"]))
    bigger = scheduler_pb2.Resources(vcpus=2, memory_mb=1024, disk_gb=20)
    moved = await replica.stub.MoveAllocations(scheduler_pb2.MoveAllocationsRequest(
        consumer_id=consumer, resources=bigger))
    assert [(a.node_name, a.resources.vcpus) for a in moved.allocations] == [
        ("src", 1), ("dst", 2)]
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await replica.stub.MoveAllocations(scheduler_pb2.MoveAllocationsRequest(
            consumer_id=consumer, target_node="src"))
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await replica.stub.ReleaseAllocations(scheduler_pb2.ReleaseAllocationsRequest(
        consumer_id=consumer, node_name="src"))
    held = await replica.stub.GetAllocations(
        scheduler_pb2.GetAllocationsRequest(consumer_id=consumer))
    assert [a.node_name for a in held.allocations] == ["dst"]
    src = await store.get(keys.node_usage("src"), scheduler_pb2.NodeUsage)
    dst = await store.get(keys.node_usage("dst"), scheduler_pb2.NodeUsage)
    assert src.value.used.vcpus == 0 and dst.value.used.vcpus == 2


async def test_server_group_crud(start: Start) -> None:
    replica = await start()
    made = await replica.stub.CreateServerGroup(scheduler_pb2.CreateServerGroupRequest(
        server_group=scheduler_pb2.ServerGroup(
            meta=resource_pb2.ResourceMeta(name="g1"), policy=scheduler_pb2.SOFT_AFFINITY)))
    listed = await replica.stub.ListServerGroups(scheduler_pb2.ListServerGroupsRequest())
    assert [g.meta.id for g in listed.server_groups] == [made.meta.id]
    await replica.stub.DeleteServerGroup(scheduler_pb2.DeleteServerGroupRequest(id=made.meta.id))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await replica.stub.GetServerGroup(scheduler_pb2.GetServerGroupRequest(id=made.meta.id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


BAD_REQUESTS = [
    ("SelectDestinations", spec(resources=SMALL), grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", resources=scheduler_pb2.Resources()),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", resources=scheduler_pb2.Resources(vcpus=-1)),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("a/b"), grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", "c-1"), grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", required_traits=["lower"]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", required_traits=["X"], forbidden_traits=["X"]),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("SelectDestinations", spec("c-1", server_group_id=str(uuid.UUID(int=1))),
     grpc.StatusCode.NOT_FOUND),
    ("GetNode", scheduler_pb2.GetNodeRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT),
    ("GetNode", scheduler_pb2.GetNodeRequest(name="../etc"), grpc.StatusCode.INVALID_ARGUMENT),
    ("GetNode", scheduler_pb2.GetNodeRequest(name="nope"), grpc.StatusCode.NOT_FOUND),
    ("UpdateNode", scheduler_pb2.UpdateNodeRequest(name="n1"),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("UpdateNode", scheduler_pb2.UpdateNodeRequest(
        name="n1", update_mask=field_mask_pb2.FieldMask(paths=["id"])),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("UpdateNode", scheduler_pb2.UpdateNodeRequest(
        name="n1", settings=scheduler_pb2.NodeSettings(
            allocation_ratios=scheduler_pb2.AllocationRatios(cpu=-2)),
        update_mask=field_mask_pb2.FieldMask(paths=["allocation_ratios"])),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("UpdateNode", scheduler_pb2.UpdateNodeRequest(
        name="ghost", update_mask=field_mask_pb2.FieldMask(paths=["disabled"])),
     grpc.StatusCode.NOT_FOUND),
    ("GetAllocations", scheduler_pb2.GetAllocationsRequest(), grpc.StatusCode.INVALID_ARGUMENT),
    ("ReleaseAllocations", scheduler_pb2.ReleaseAllocationsRequest(consumer_id="c-404"),
     grpc.StatusCode.NOT_FOUND),
    ("MoveAllocations", scheduler_pb2.MoveAllocationsRequest(consumer_id="c-404"),
     grpc.StatusCode.NOT_FOUND),
    ("CreateServerGroup", scheduler_pb2.CreateServerGroupRequest(),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("GetServerGroup", scheduler_pb2.GetServerGroupRequest(id=""),
     grpc.StatusCode.INVALID_ARGUMENT),
    ("DeleteServerGroup", scheduler_pb2.DeleteServerGroupRequest(id="g-404"),
     grpc.StatusCode.NOT_FOUND),
    ("ListNodes", scheduler_pb2.ListNodesRequest(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT),
]


async def test_bad_requests_get_clear_codes(store: Store, start: Start) -> None:
    await harness.put_node(store, harness.report("n1"))
    replica = await start()
    await nodes_seen(replica, 1)
    for method, request, code in BAD_REQUESTS:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await getattr(replica.stub, method)(request)
        assert failed.value.code() == code, (method, request, failed.value.details())


async def test_claiming_again_for_one_consumer_returns_the_first_claim(
    store: Store, start: Start
) -> None:
    """A retry after a lost reply gets its destinations back and claims nothing more."""
    await harness.put_node(store, harness.report("n1"))
    await harness.put_node(store, harness.report("n2"))
    replica = await start()
    await nodes_seen(replica, 2)
    first, second = new_id(), new_id()
    made = await replica.stub.SelectDestinations(spec(first, second))
    again = await replica.stub.SelectDestinations(spec(first, second))
    assert list(again.destinations) == list(made.destinations)
    assert {d.queue for d in again.destinations} <= {"node.n1", "node.n2"}
    usages = [await store.find(keys.node_usage(n), scheduler_pb2.NodeUsage) for n in ("n1", "n2")]
    assert sum(usage.value.allocation_count for usage in usages if usage is not None) == 2


@pytest.mark.parametrize("change", ["resources", "extra-consumer", "project"])
async def test_claiming_something_else_for_a_consumer_is_already_exists(
    store: Store, start: Start, change: str
) -> None:
    await harness.put_node(store, harness.report("n1"))
    replica = await start()
    await nodes_seen(replica, 1)
    consumer = new_id()
    await replica.stub.SelectDestinations(spec(consumer, project_id="p-1"))
    other = {
        "resources": spec(consumer, project_id="p-1",
                          resources=scheduler_pb2.Resources(vcpus=2, memory_mb=512)),
        "extra-consumer": spec(consumer, new_id(), project_id="p-1"),
        "project": spec(consumer, project_id="p-2"),
    }[change]
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await replica.stub.SelectDestinations(other)
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "already holds other allocations" in (twice.value.details() or "")
    usage = await store.get(keys.node_usage("n1"), scheduler_pb2.NodeUsage)
    assert usage.value.allocation_count == 1 and usage.value.used == SMALL


async def test_another_projects_server_group_is_not_found(store: Store, start: Start) -> None:
    for name in ("a", "b"):
        await harness.put_node(store, harness.report(name))
    replica = await start()
    await nodes_seen(replica, 2)
    group = await replica.stub.CreateServerGroup(scheduler_pb2.CreateServerGroupRequest(
        server_group=scheduler_pb2.ServerGroup(
            meta=resource_pb2.ResourceMeta(name="theirs", project_id="project-a"),
            policy=scheduler_pb2.ANTI_AFFINITY)))
    assert group.meta.project_id == "project-a"
    outsider = new_id()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.stub.SelectDestinations(
            spec(outsider, server_group_id=group.meta.id, project_id="project-b"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing was claimed and the group gained no member.
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await replica.stub.GetAllocations(
            scheduler_pb2.GetAllocationsRequest(consumer_id=outsider))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    fetched = await replica.stub.GetServerGroup(
        scheduler_pb2.GetServerGroupRequest(id=group.meta.id))
    assert not fetched.member_nodes
    placed = await replica.stub.SelectDestinations(
        spec(new_id(), server_group_id=group.meta.id, project_id="project-a"))
    assert placed.destinations[0].node_name in {"a", "b"}
