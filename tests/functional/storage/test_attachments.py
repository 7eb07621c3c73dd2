"""Attachments: reserve → begin → complete, detach; races, other nodes, delete while attached."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from nubis.storage.v1 import attachment_pb2, volume_pb2

from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import NODES, VolumeCloud, wait_state

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
