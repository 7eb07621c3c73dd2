"""Volumes made from an image (the node fetches it once) and from a snapshot; snapshot rules."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2, snapshot_pb2, volume_pb2

from services.identity import policy as identity_policy
from tests.functional.storage.harness import raw_bytes, upload_messages
from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import (
    GIB,
    NODES,
    VolumeCloud,
    active_image,
    wait_for,
    wait_gone,
    wait_state,
)

Volume = volume_pb2.Volume
Snapshot = snapshot_pb2.Snapshot


async def _snapshot_state(cloud: VolumeCloud, snapshot_id: str, states: set[int]) -> Snapshot:
    stub = cloud.stub()
    found: list[Snapshot] = []

    async def reached() -> bool:
        found[:] = [await stub.GetSnapshot(snapshot_pb2.GetSnapshotRequest(id=snapshot_id),
                                           metadata=cloud.admin)]
        return found[0].state in states

    await wait_for(reached)
    return found[0]


def _code(exc: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return exc.value.code()


async def test_snapshot_rules_and_a_volume_made_from_a_snapshot(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("origin", 2, node=NODES[0]), metadata=cloud.admin)
    origin = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
    snap = await stub.CreateSnapshot(snapshot_pb2.CreateSnapshotRequest(snapshot=Snapshot(
        meta=resource_pb2.ResourceMeta(name="snap"), volume_id=origin.meta.id)),
        metadata=cloud.admin)
    assert snap.state == Snapshot.CREATING and snap.size_gb == 2
    snap = await _snapshot_state(cloud, snap.meta.id, {Snapshot.AVAILABLE})
    copy = await cloud.ask_agent(NODES[0], f"snapshot-{snap.meta.id}", origin.pool_name)
    assert copy.found and copy.volume.capacity_bytes == 2 * GIB

    with pytest.raises(grpc.aio.AioRpcError) as has_snapshots:
        await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=origin.meta.id),
                                metadata=cloud.admin)
    assert _code(has_snapshots) == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.aio.AioRpcError) as too_small:
        await stub.CreateVolume(new_volume("small", 1, source_snapshot_id=snap.meta.id),
                                metadata=cloud.admin)
    assert _code(too_small) == grpc.StatusCode.INVALID_ARGUMENT
    child = await stub.CreateVolume(new_volume("child", 3, source_snapshot_id=snap.meta.id),
                                    metadata=cloud.admin)
    assert child.node == NODES[0]  # the snapshot's node, whatever was asked
    child = await wait_state(stub, child.meta.id, cloud.admin, {Volume.AVAILABLE})
    seen = await cloud.ask_agent(NODES[0], child.libvirt_name, child.pool_name)
    assert seen.volume.capacity_bytes == 3 * GIB
    assert seen.volume.backing_volume == f"snapshot-{snap.meta.id}"

    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await stub.DeleteSnapshot(snapshot_pb2.DeleteSnapshotRequest(id=snap.meta.id),
                                  metadata=cloud.admin)
    assert _code(in_use) == grpc.StatusCode.FAILED_PRECONDITION
    assert child.meta.id in (in_use.value.details() or "")

    await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=child.meta.id),
                            metadata=cloud.admin)
    await wait_gone(stub, child.meta.id, cloud.admin)
    deleting = await stub.DeleteSnapshot(snapshot_pb2.DeleteSnapshotRequest(id=snap.meta.id),
                                         metadata=cloud.admin)
    assert deleting.state == Snapshot.DELETING

    async def snapshot_gone() -> bool:
        listed = await stub.ListSnapshots(snapshot_pb2.ListSnapshotsRequest(
            filter=f"volume_id={origin.meta.id}"), metadata=cloud.admin)
        return not listed.snapshots

    await wait_for(snapshot_gone)
    assert not (await cloud.ask_agent(NODES[0], f"snapshot-{snap.meta.id}",
                                      origin.pool_name)).found
    await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=origin.meta.id),
                            metadata=cloud.admin)
    await wait_gone(stub, origin.meta.id, cloud.admin)


async def test_a_volume_from_an_image_and_the_image_it_holds(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    data = raw_bytes(1 << 20)
    image = await stub.CreateImage(image_pb2.CreateImageRequest(image=image_pb2.Image(
        meta=resource_pb2.ResourceMeta(name="base"),
        disk_format=image_pb2.Image.DISK_FORMAT_RAW)), metadata=cloud.admin)
    header = image_pb2.ImageUploadHeader(image_id=image.meta.id, size_bytes=len(data),
                                         checksum_sha256=hashlib.sha256(data).hexdigest())
    active = await stub.UploadImage(upload_messages(header, data), metadata=cloud.admin)
    assert active.state == image_pb2.Image.ACTIVE

    made = await stub.CreateVolume(new_volume("boot", 1, source_image_id=image.meta.id),
                                   metadata=cloud.admin)
    assert made.bootable
    ready = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE, Volume.ERROR})
    assert ready.state == Volume.AVAILABLE, ready.fault
    seen = await cloud.ask_agent(ready.node, ready.libvirt_name, ready.pool_name)
    assert seen.found and seen.volume.capacity_bytes == GIB
    cached = await cloud.ask_agent(ready.node, f"image-{image.meta.id}", ready.pool_name)
    assert cached.found  # fetched once into the node's cache

    with pytest.raises(grpc.aio.AioRpcError) as in_use:
        await stub.DeleteImage(image_pb2.DeleteImageRequest(id=image.meta.id),
                               metadata=cloud.admin)
    assert _code(in_use) == grpc.StatusCode.FAILED_PRECONDITION
    await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id),
                            metadata=cloud.admin)
    await wait_gone(stub, made.meta.id, cloud.admin)
    await stub.DeleteImage(image_pb2.DeleteImageRequest(id=image.meta.id), metadata=cloud.admin)


async def test_an_agent_logs_in_at_start_so_its_first_download_waits_for_no_login(
        cloud: VolumeCloud) -> None:
    """Every agent logs in to storage as it starts: the node's first image download (a
    volume made from an image it never fetched) makes identity issue no token."""
    registry = cloud.identity.running.registry
    method = f"/{identity_policy.SERVICE}/Authenticate"

    def logins() -> float:
        return registry.get_sample_value("nubis_rpc_handled_total",
                                         {"method": method, "code": "OK"}) or 0.0

    async def settled() -> bool:  # each agent's login, and the service's, are done
        before = logins()
        await asyncio.sleep(1.0)
        return logins() == before and before >= len(NODES)

    await wait_for(settled, 30)
    issued = logins()
    image_id = await active_image(cloud)
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("first-fetch", 1, node=NODES[0],
                                              source_image_id=image_id), metadata=cloud.admin)
    ready = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE, Volume.ERROR})
    assert ready.state == Volume.AVAILABLE, ready.fault
    assert logins() == issued
