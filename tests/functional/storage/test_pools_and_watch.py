"""Pools as libvirt reports them, an operator's extra pool, the volume watch and root disks."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.storage.v1 import pool_pb2, volume_pb2

from services.common import tasks
from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import (
    NODES,
    VolumeCloud,
    active_image,
    wait_for,
    wait_state,
)

Volume = volume_pb2.Volume
Pool = pool_pb2.StoragePool


async def _pool_info(cloud: VolumeCloud, node: str, name: str) -> tasks_pb2.StoragePoolInfo:
    return await cloud.sender.send(node, tasks.POOL_INFO, tasks_pb2.PoolInfoRequest(pool=name),
                                   operation_id=tasks.new_operation_id())


async def test_pools_show_what_libvirt_reports_and_an_extra_pool_can_be_drained(
    cloud: VolumeCloud, tmp_path: Path,
) -> None:
    stub = cloud.stub()
    listed = await stub.ListStoragePools(pool_pb2.ListStoragePoolsRequest(), metadata=cloud.admin)
    assert {pool.node for pool in listed.storage_pools} == set(NODES)
    first = next(pool for pool in listed.storage_pools if pool.node == NODES[0])
    live = await _pool_info(cloud, NODES[0], first.libvirt_name)
    assert (first.capacity_bytes, first.state) == (live.capacity_bytes, Pool.ACTIVE)
    assert first.path == live.path
    assert (await stub.GetStoragePool(pool_pb2.GetStoragePoolRequest(id=first.meta.id),
                                      metadata=cloud.admin)).meta.id == first.meta.id

    made = await stub.CreateStoragePool(pool_pb2.CreateStoragePoolRequest(storage_pool=Pool(
        meta=resource_pb2.ResourceMeta(name="extra"), node=NODES[1],
        path=str(tmp_path / "extra-pool"))), metadata=cloud.admin)
    assert made.libvirt_name == "nubis-extra"
    assert (await _pool_info(cloud, NODES[1], "nubis-extra")).active

    async def reported() -> bool:
        found = await stub.GetStoragePool(pool_pb2.GetStoragePoolRequest(id=made.meta.id),
                                          metadata=cloud.admin)
        return found.state == Pool.ACTIVE

    await wait_for(reported, 30)
    volume = await stub.CreateVolume(new_volume("in-extra", 1, node=NODES[1],
                                                pool_id=made.meta.id), metadata=cloud.admin)
    ready = await wait_state(stub, volume.meta.id, cloud.admin, {Volume.AVAILABLE})
    assert ready.pool_name == "nubis-extra"
    assert (await cloud.ask_agent(NODES[1], ready.libvirt_name, "nubis-extra")).found

    await stub.UpdateStoragePool(pool_pb2.UpdateStoragePoolRequest(
        storage_pool=Pool(meta=resource_pb2.ResourceMeta(id=made.meta.id), state=Pool.DISABLED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=cloud.admin)
    with pytest.raises(grpc.aio.AioRpcError) as drained:
        await stub.CreateVolume(new_volume("not-there", 1, node=NODES[1], pool_id=made.meta.id),
                                metadata=cloud.admin)
    assert drained.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await stub.DeleteStoragePool(pool_pb2.DeleteStoragePoolRequest(id=made.meta.id),
                                     metadata=cloud.admin)
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_watch_sees_a_volume_through_its_life(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    events: list[volume_pb2.VolumeEvent] = []
    synced = asyncio.Event()

    async def follow() -> None:
        async for event in stub.WatchVolumes(volume_pb2.WatchVolumesRequest(),
                                             metadata=cloud.admin):
            if event.type == resource_pb2.EVENT_TYPE_SYNCED:
                synced.set()
            else:
                events.append(event)

    watcher = asyncio.create_task(follow())
    try:
        await asyncio.wait_for(synced.wait(), 10)
        made = await stub.CreateVolume(new_volume("watched", 1), metadata=cloud.admin)
        await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
        await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id),
                                metadata=cloud.admin)

        async def deleted() -> bool:
            return any(e.type == resource_pb2.EVENT_TYPE_DELETED for e in events)

        await wait_for(deleted, 30)
    finally:
        watcher.cancel()
    mine = [e for e in events if e.volume.meta.id == made.meta.id]
    assert mine[0].type == resource_pb2.EVENT_TYPE_ADDED
    assert mine[0].volume.state == Volume.CREATING
    states = [e.volume.state for e in mine]
    assert Volume.AVAILABLE in states and Volume.DELETING in states
    assert mine[-1].type == resource_pb2.EVENT_TYPE_DELETED
    revisions = [e.revision for e in mine]
    assert revisions == sorted(revisions)


async def test_a_root_disk_is_made_once_per_instance_outside_volume_quota(
    cloud: VolumeCloud,
) -> None:
    stub = cloud.stub()
    project, _member = await cloud.member_of_new_project("root")
    image_id = await active_image(cloud, public=True)
    instance = str(uuid.uuid4())
    ask = volume_pb2.CreateRootDiskRequest(instance_id=instance, project_id=project,
                                           image_id=image_id, node=NODES[1], size_gb=2)
    first = await stub.CreateRootDisk(ask, metadata=cloud.admin)
    again = await stub.CreateRootDisk(ask, metadata=cloud.admin)
    assert again.meta.id == first.meta.id
    assert (first.root_disk_of_instance_id, first.node, first.meta.project_id) == (
        instance, NODES[1], project)
    ready = await wait_state(stub, first.meta.id, cloud.admin, {Volume.AVAILABLE, Volume.ERROR})
    assert ready.state == Volume.AVAILABLE, ready.fault
    assert ready.bootable
    assert (await cloud.ask_agent(NODES[1], ready.libvirt_name, ready.pool_name)).found
    usage = await cloud.identity_stub.GetUsage(identity_pb2.GetUsageRequest(project_id=project),
                                               metadata=cloud.admin)
    assert usage.in_use["volumes"] == 0

    with pytest.raises(grpc.aio.AioRpcError) as no_image:
        await stub.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
            instance_id=str(uuid.uuid4()), project_id=project, image_id=str(uuid.uuid4()),
            node=NODES[0], size_gb=1), metadata=cloud.admin)
    assert no_image.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_watch_from_a_revision_sees_a_delete_made_before_it_opened(
        cloud: VolumeCloud) -> None:
    """What a waiter does: Get, then watch from the revision it read. A volume deleted in
    between is gone from the listing when the watch opens; its DELETED still comes."""
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("deleted-early", 1), metadata=cloud.admin)
    await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
    read = await stub.GetVolume(volume_pb2.GetVolumeRequest(id=made.meta.id),
                                metadata=cloud.admin)
    await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id),
                            metadata=cloud.admin)

    async def gone() -> bool:
        try:
            await stub.GetVolume(volume_pb2.GetVolumeRequest(id=made.meta.id),
                                 metadata=cloud.admin)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    await wait_for(gone, 30)
    request = volume_pb2.WatchVolumesRequest(
        options=resource_pb2.WatchOptions(start_revision=read.meta.revision))
    seen = []
    async with asyncio.timeout(15):
        async for event in stub.WatchVolumes(request, metadata=cloud.admin):
            if event.volume.meta.id == made.meta.id:
                seen.append(event.type)
                if event.type == resource_pb2.EVENT_TYPE_DELETED:
                    break
    # Known at the start (not ADDED by the replay), then DELETING, then gone.
    assert seen == [resource_pb2.EVENT_TYPE_MODIFIED, resource_pb2.EVENT_TYPE_DELETED]

    ahead = volume_pb2.WatchVolumesRequest(
        options=resource_pb2.WatchOptions(start_revision=read.meta.revision + 10**9))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stub.WatchVolumes(ahead, metadata=cloud.admin):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
