"""Attachments: reserve → begin → complete, detach; races, other nodes, delete while attached."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from nubis.storage.v1 import attachment_pb2, volume_pb2

from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import NODES, VolumeCloud, active_image, wait_state

Volume = volume_pb2.Volume
Attachment = attachment_pb2.VolumeAttachment


async def _available(cloud: VolumeCloud, node: str = NODES[0]) -> Volume:
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume(f"att-{uuid.uuid4().hex[:6]}", 1, node=node),
                                   metadata=cloud.admin)
    return await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})


async def test_attach_and_detach_walk_the_volume_through_its_states(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    volume = await _available(cloud)
    instance = str(uuid.uuid4())
    reserved = await stub.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
        volume_id=volume.meta.id, instance_id=instance, node=NODES[0]), metadata=cloud.admin)
    assert reserved.state == Attachment.RESERVED
    again = await stub.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
        volume_id=volume.meta.id, instance_id=instance, node=NODES[0]), metadata=cloud.admin)
    assert again.meta.id == reserved.meta.id  # idempotent per (volume, instance)
    states = []
    begun = await stub.BeginAttach(attachment_pb2.BeginAttachRequest(
        attachment_id=reserved.meta.id, device_name="vdb"), metadata=cloud.admin)
    assert begun.connection.volume_name == volume.libvirt_name and begun.connection.path
    states.append((await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume.meta.id),
                                        metadata=cloud.admin)).state)
    await stub.CompleteAttach(attachment_pb2.CompleteAttachRequest(
        attachment_id=reserved.meta.id), metadata=cloud.admin)
    states.append((await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume.meta.id),
                                        metadata=cloud.admin)).state)
    await stub.BeginDetach(attachment_pb2.BeginDetachRequest(
        attachment_id=reserved.meta.id), metadata=cloud.admin)
    states.append((await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume.meta.id),
                                        metadata=cloud.admin)).state)
    done = await stub.CompleteDetach(attachment_pb2.CompleteDetachRequest(
        attachment_id=reserved.meta.id), metadata=cloud.admin)
    states.append(done.state)
    assert states == [Volume.ATTACHING, Volume.IN_USE, Volume.DETACHING, Volume.AVAILABLE]
    assert not done.attachments
    listed = await stub.ListVolumeAttachments(attachment_pb2.ListVolumeAttachmentsRequest(
        filter=f"volume_id={volume.meta.id}"), metadata=cloud.admin)
    assert not listed.volume_attachments


async def test_two_racing_reservations_exactly_one_wins(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    volume = await _available(cloud)
    requests = [attachment_pb2.ReserveVolumeRequest(
        volume_id=volume.meta.id, instance_id=str(uuid.uuid4()), node=NODES[0])
        for _ in range(8)]
    results = await asyncio.gather(*(stub.ReserveVolume(r, metadata=cloud.admin)
                                     for r in requests), return_exceptions=True)
    won = [r for r in results if isinstance(r, Attachment)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 7
    assert {exc.code() for exc in lost} == {grpc.StatusCode.FAILED_PRECONDITION}
    current = await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume.meta.id),
                                   metadata=cloud.admin)
    assert current.state == Volume.RESERVED
    assert [ref.instance_id for ref in current.attachments] == [won[0].instance_id]


async def test_an_attach_across_nodes_is_refused_saying_so(cloud: VolumeCloud) -> None:
    volume = await _available(cloud, NODES[0])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.stub().ReserveVolume(attachment_pb2.ReserveVolumeRequest(
            volume_id=volume.meta.id, instance_id=str(uuid.uuid4()), node=NODES[1]),
            metadata=cloud.admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert NODES[0] in (refused.value.details() or "")
    assert NODES[1] in (refused.value.details() or "")


async def test_delete_while_attached_is_failed_precondition(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    volume = await _available(cloud)
    await stub.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
        volume_id=volume.meta.id, instance_id=str(uuid.uuid4()), node=NODES[0]),
        metadata=cloud.admin)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=volume.meta.id),
                                metadata=cloud.admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "attached" in (refused.value.details() or "")


async def test_a_root_disk_asked_with_a_device_is_made_reserved_and_begins_attaching(
    cloud: VolumeCloud,
) -> None:
    """CreateRootDisk with device_name: the answer names the attachment; once made, the
    volume is ATTACHING through it with its connection, and CompleteAttach ends it IN_USE."""
    stub = cloud.stub()
    instance = str(uuid.uuid4())
    image_id = await active_image(cloud, public=True)
    made = await stub.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
        instance_id=instance, project_id=cloud.admin_project, image_id=image_id,
        node=NODES[0], size_gb=1, device_name="vda"), metadata=cloud.admin)
    assert [(ref.instance_id, ref.device_name) for ref in made.attachments] == [(instance, "vda")]
    attachment_id = made.attachments[0].attachment_id
    ready = await wait_state(stub, made.meta.id, cloud.admin, {Volume.ATTACHING, Volume.ERROR})
    assert ready.state == Volume.ATTACHING, ready.fault
    begun = await stub.GetVolumeAttachment(attachment_pb2.GetVolumeAttachmentRequest(
        id=attachment_id), metadata=cloud.admin)
    assert (begun.state, begun.instance_id, begun.node, begun.device_name) == (
        Attachment.ATTACHING, instance, NODES[0], "vda")
    assert (begun.connection.path, begun.connection.format, begun.connection.volume_name) == (
        ready.path, ready.format, ready.libvirt_name)
    assert begun.connection.path
    again = await stub.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
        instance_id=instance, project_id=cloud.admin_project, image_id=image_id,
        node=NODES[0], size_gb=1, device_name="vda"), metadata=cloud.admin)
    assert [ref.attachment_id for ref in again.attachments] == [attachment_id]  # one disk, one
    await stub.CompleteAttach(attachment_pb2.CompleteAttachRequest(
        attachment_id=attachment_id), metadata=cloud.admin)
    in_use = await stub.GetVolume(volume_pb2.GetVolumeRequest(id=made.meta.id),
                                  metadata=cloud.admin)
    assert in_use.state == Volume.IN_USE
    with pytest.raises(grpc.aio.AioRpcError) as long_name:
        await stub.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
            instance_id=str(uuid.uuid4()), project_id=cloud.admin_project, image_id=image_id,
            node=NODES[0], size_gb=1, device_name="v" * 33), metadata=cloud.admin)
    assert long_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_root_disk_detached_or_begun_while_being_made_never_looks_made(
    cloud: VolumeCloud,
) -> None:
    """A build that fails while its root disk is made detaches it at once; a BeginAttach
    may come as early. Whenever either lands, the volume is CREATING until the node made it
    (never AVAILABLE or ATTACHING without a path), and it ends AVAILABLE, unattached."""
    stub = cloud.stub()
    image_id = await active_image(cloud, public=True, size=8 << 20)
    for detach in (True, False, True, False):
        made = await stub.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
            instance_id=str(uuid.uuid4()), project_id=cloud.admin_project, image_id=image_id,
            node=NODES[1], size_gb=1, device_name="vda"), metadata=cloud.admin)
        attachment_id = made.attachments[0].attachment_id
        if detach:
            after = await stub.CompleteDetach(attachment_pb2.CompleteDetachRequest(
                attachment_id=attachment_id), metadata=cloud.admin)
            assert not after.attachments
            assert after.state == Volume.CREATING or (after.state == Volume.AVAILABLE
                                                      and after.path), after
            ended = await wait_state(stub, made.meta.id, cloud.admin,
                                     {Volume.AVAILABLE, Volume.ERROR})
            assert (ended.state, list(ended.attachments)) == (Volume.AVAILABLE, [])
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await stub.GetVolumeAttachment(attachment_pb2.GetVolumeAttachmentRequest(
                    id=attachment_id), metadata=cloud.admin)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        else:
            try:
                begun = await stub.BeginAttach(attachment_pb2.BeginAttachRequest(
                    attachment_id=attachment_id, device_name="vda"), metadata=cloud.admin)
                assert begun.connection.path  # the volume was made already
            except grpc.aio.AioRpcError as refused:
                assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "still being made" in (refused.details() or "")
            ended = await wait_state(stub, made.meta.id, cloud.admin,
                                     {Volume.ATTACHING, Volume.ERROR})
            assert ended.state == Volume.ATTACHING, ended.fault
        await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id, force=True),
                                metadata=cloud.admin)
