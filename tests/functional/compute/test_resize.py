"""Resize with confirm and revert on two real agents: allocations exact on both nodes at every
step (asked of the scheduler), domains asked of each node's libvirt, quota by the larger
flavor while the resize awaits its outcome, and a delete during a resize leaves nothing."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.scheduler.v1 import scheduler_pb2

from services.common import quota, resources
from services.compute import keys
from tests.functional.compute.harness import NODES, ComputeCloud, Instance, cloud

__all__ = ["cloud"]

TaskState = Instance.TaskState
Sizes = tuple[int, int, int]  # vcpus, memory_mb, disk_gb


async def make_flavor(cloud: ComputeCloud, vcpus: int, ram_mb: int, disk_gb: int = 1) -> str:
    flavor = flavor_pb2.Flavor(meta=resources.fresh_meta(resource_pb2.ResourceMeta(
        name=f"r{vcpus}-{uuid.uuid4().hex[:4]}")), state=flavor_pb2.Flavor.ACTIVE, vcpus=vcpus,
        ram_mb=ram_mb, disk_gb=disk_gb, is_public=True)
    await cloud.base.store.create(keys.flavor(flavor.meta.id), flavor)
    return flavor.meta.id


async def booted(cloud: ComputeCloud) -> Instance:
    made = await cloud.create()
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    return found


async def allocations(cloud: ComputeCloud, instance_id: str) -> dict[str, Sizes]:
    """The instance's claims per node, asked of the scheduler."""
    try:
        held = await cloud.scheduler_stub().GetAllocations(
            scheduler_pb2.GetAllocationsRequest(consumer_id=instance_id), metadata=cloud.admin)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    return {a.node_name: (a.resources.vcpus, a.resources.memory_mb, a.resources.disk_gb)
            for a in held.allocations}


async def node_usage(cloud: ComputeCloud) -> dict[str, Sizes]:
    """What each node counts as used, asked of the scheduler."""
    found = {}
    for name in NODES:
        node = await cloud.scheduler_stub().GetNode(scheduler_pb2.GetNodeRequest(name=name),
                                                    metadata=cloud.admin)
        found[name] = (node.used.vcpus, node.used.memory_mb, node.used.disk_gb)
    return found


async def exact(cloud: ComputeCloud, instance_id: str) -> dict[str, Sizes]:
    """The instance's claims, checked to be all that each node counts (it is alone here).

    Read again until the claims are the same before and after the nodes' usage
    (a step of the move may land between two reads).
    """
    held = await allocations(cloud, instance_id)
    while True:
        used = await node_usage(cloud)
        again = await allocations(cloud, instance_id)
        if again == held:
            break
        held = again
    for name in NODES:
        assert used[name] == held.get(name, (0, 0, 0)), (name, used, held)
    return held


async def usage(cloud: ComputeCloud) -> tuple[int, int]:
    found, _ = await quota.in_use(cloud.base.store, cloud.project)
    return found["vcpus"], found["ram_mb"]


async def follow(cloud: ComputeCloud, instance_id: str, until: tuple[int, ...],
                 within: float = 60.0) -> tuple[Instance, list[tuple[int, dict[str, Sizes]]]]:
    """Poll the instance until its state is in `until` (idle); every (task state, claims) seen."""
    seen: list[tuple[int, dict[str, Sizes]]] = []
    async with asyncio.timeout(within):
        while True:
            found = await cloud.get(instance_id)
            assert found is not None
            seen.append((found.task_state, await exact(cloud, instance_id)))
            if found.state in until and not found.task_id:
                return found, seen
            await asyncio.sleep(0.05)


async def resize_to_verify(cloud: ComputeCloud, server: Instance,
                           flavor_id: str) -> tuple[Instance, list[tuple[int, dict[str, Sizes]]]]:
    started = await cloud.stub().ResizeInstance(V.ResizeInstanceRequest(
        id=server.meta.id, flavor_id=flavor_id), metadata=cloud.admin)
    assert started.state == Instance.RESIZING
    assert started.task_state == TaskState.TASK_STATE_RESIZE_PREP
    return await follow(cloud, server.meta.id, (Instance.VERIFY_RESIZE, Instance.ACTIVE,
                                                Instance.ERROR))


OLD: Sizes = (1, 64, 1)
NEW: Sizes = (2, 128, 1)


def check_steps(seen: list[tuple[int, dict[str, Sizes]]], source: str) -> None:
    """At every step the source holds the old sizes; once claimed, one other node the new."""
    for step, held in seen:
        assert held.get(source) == OLD, (step, held)
        others = {node: sizes for node, sizes in held.items() if node != source}
        assert others in ({}, {n: NEW for n in others}) and len(others) <= 1, (step, held)
        if step in (TaskState.TASK_STATE_RESIZE_MIGRATING, TaskState.TASK_STATE_RESIZE_FINISH):
            assert len(others) == 1, (step, held)


async def test_resize_then_confirm_keeps_allocations_exact(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    source = server.node
    assert await exact(cloud, server.meta.id) == {source: OLD}
    assert await usage(cloud) == (1, 64)
    bigger = await make_flavor(cloud, *NEW)
    found, seen = await resize_to_verify(cloud, server, bigger)
    assert found.state == Instance.VERIFY_RESIZE, found.fault.message
    check_steps(seen, source)
    destination = found.node
    assert destination != source
    assert found.migration.source_node == source
    assert found.migration.destination_node == destination
    assert found.migration.old_flavor_id == server.flavor_id
    assert found.migration.new_flavor_id == bigger and found.flavor_id == bigger
    assert (found.flavor.vcpus, found.flavor.ram_mb) == (2, 128)
    assert found.root_volume_id != server.root_volume_id
    assert await exact(cloud, server.meta.id) == {source: OLD, destination: NEW}
    assert await usage(cloud) == (2, 128)  # the larger flavor while awaiting the outcome
    assert await cloud.domain_state(destination, server.meta.id) == "running"
    assert await cloud.domain_state(source, server.meta.id) == "shutoff"

    await cloud.stub().ConfirmResize(V.ConfirmResizeRequest(id=server.meta.id),
                                     metadata=cloud.admin)
    done, seen = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    assert not done.HasField("migration")
    for _, held in seen:
        assert held in ({source: OLD, destination: NEW}, {destination: NEW}), held
    assert await exact(cloud, server.meta.id) == {destination: NEW}
    assert await usage(cloud) == (2, 128)
    assert server.meta.id not in [d.instance_id for d in await cloud.domains(source)]
    assert await cloud.domain_state(destination, server.meta.id) == "running"
    left = await cloud.leftovers([server.meta.id])
    assert left.volumes == [done.root_volume_id]  # the source's disk is gone

    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    left = await cloud.wait_clean([server.meta.id])
    assert left.empty(), left


async def test_resize_then_revert_restores_the_source(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    source = server.node
    bigger = await make_flavor(cloud, *NEW)
    found, seen = await resize_to_verify(cloud, server, bigger)
    assert found.state == Instance.VERIFY_RESIZE, found.fault.message
    check_steps(seen, source)
    destination = found.node

    await cloud.stub().RevertResize(V.RevertResizeRequest(id=server.meta.id),
                                    metadata=cloud.admin)
    done, seen = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    for _, held in seen:
        assert held in ({source: OLD, destination: NEW}, {source: OLD}), held
    assert await exact(cloud, server.meta.id) == {source: OLD}
    assert done.node == source and done.flavor_id == server.flavor_id
    assert (done.flavor.vcpus, done.flavor.ram_mb) == (1, 64)
    assert done.root_volume_id == server.root_volume_id
    assert not done.HasField("migration")
    assert await usage(cloud) == (1, 64)  # the growth came back
    assert await cloud.domain_state(source, server.meta.id) == "running"
    assert server.meta.id not in [d.instance_id for d in await cloud.domains(destination)]
    left = await cloud.leftovers([server.meta.id])
    assert left.volumes == [server.root_volume_id]  # the destination's disk is gone

    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    assert (await cloud.wait_clean([server.meta.id])).empty()


async def test_delete_awaiting_confirmation_leaves_nothing(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    found, _ = await resize_to_verify(cloud, server, await make_flavor(cloud, *NEW))
    assert found.state == Instance.VERIFY_RESIZE, found.fault.message
    assert len(await exact(cloud, server.meta.id)) == 2
    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    left = await cloud.wait_clean([server.meta.id])
    assert left.empty(), left
    assert await node_usage(cloud) == {name: (0, 0, 0) for name in NODES}


@pytest.mark.parametrize("at", [TaskState.TASK_STATE_RESIZE_PREP,
                                TaskState.TASK_STATE_RESIZE_MIGRATING])
async def test_delete_in_the_middle_of_a_resize_leaves_nothing(cloud: ComputeCloud,
                                                               at: int) -> None:
    server = await booted(cloud)
    await cloud.stub().ResizeInstance(V.ResizeInstanceRequest(
        id=server.meta.id, flavor_id=await make_flavor(cloud, *NEW)), metadata=cloud.admin)
    if at != TaskState.TASK_STATE_RESIZE_PREP:
        async with asyncio.timeout(30):
            while True:
                found = await cloud.get(server.meta.id)
                if found is None or found.task_state >= at:
                    break
                await asyncio.sleep(0.01)
    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    left = await cloud.wait_clean([server.meta.id])
    assert left.empty(), left
    assert await node_usage(cloud) == {name: (0, 0, 0) for name in NODES}


async def test_resize_refusals(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub = cloud.stub()
    with pytest.raises(grpc.aio.AioRpcError) as same:
        await stub.ResizeInstance(V.ResizeInstanceRequest(id=server.meta.id,
                                                          flavor_id=server.flavor_id),
                                  metadata=cloud.admin)
    assert same.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.ResizeInstance(V.ResizeInstanceRequest(id=server.meta.id,
                                                          flavor_id=str(uuid.uuid4())),
                                  metadata=cloud.admin)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as idle:
        await stub.ConfirmResize(V.ConfirmResizeRequest(id=server.meta.id), metadata=cloud.admin)
    assert idle.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    huge = await make_flavor(cloud, 100000, 64)
    found, _ = await resize_to_verify(cloud, server, huge)  # no node fits: back to ACTIVE
    assert found.state == Instance.ACTIVE and found.fault.message
    assert found.flavor_id == server.flavor_id and not found.HasField("migration")
    assert await exact(cloud, server.meta.id) == {server.node: OLD}
    assert await usage(cloud) == (1, 64)
    assert await cloud.domain_state(server.node, server.meta.id) == "running"


async def test_a_stopped_instance_resizes_powered_off_and_reverts_stopped(
        cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    await cloud.stub().StopInstance(V.StopInstanceRequest(id=server.meta.id, timeout_seconds=5),
                                    metadata=cloud.admin)
    stopped, _ = await follow(cloud, server.meta.id, (Instance.STOPPED, Instance.ERROR))
    assert stopped.state == Instance.STOPPED, stopped.fault.message
    found, seen = await resize_to_verify(cloud, stopped, await make_flavor(cloud, *NEW))
    assert found.state == Instance.VERIFY_RESIZE, found.fault.message
    check_steps(seen, server.node)
    assert found.migration.stopped
    assert await cloud.domain_state(found.node, server.meta.id) == "shutoff"
    await cloud.stub().RevertResize(V.RevertResizeRequest(id=server.meta.id),
                                    metadata=cloud.admin)
    done, _ = await follow(cloud, server.meta.id, (Instance.STOPPED, Instance.ACTIVE,
                                                   Instance.ERROR))
    assert done.state == Instance.STOPPED, done.fault.message
    assert await exact(cloud, server.meta.id) == {server.node: OLD}
    assert await cloud.domain_state(server.node, server.meta.id) == "shutoff"
    assert await usage(cloud) == (1, 64)
