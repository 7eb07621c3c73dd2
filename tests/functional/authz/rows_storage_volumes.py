"""Authorization rows of StorageService's volumes, snapshots, attachments and pools.

Volumes and snapshots belong to projects: readers read, members create,
change and delete them; another project gets NOT_FOUND. Other nubis services
(compute) read and delete any project's volumes and drive the attachment
verbs and root disks, which only they and cloud-admins may call. Pools are
the operator's. The records a row works on are written straight into the
store (the world runs no agents); rows whose success would need a node or
the scheduler send a request the handler refuses as INVALID_ARGUMENT, which
shows that the policy let the caller through.
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import attachment_pb2, pool_pb2, snapshot_pb2, volume_pb2

from services.common import resources
from services.storage import keys
from tests.functional.authz.table import (
    DENIED,
    OK,
    Row,
    add_rows,
    cloud_only,
    expect,
    project_read,
    project_write,
)
from tests.functional.authz.world import World

SERVICE = "nubis.storage.v1.StorageService"
NODE = "authz-node-1"
BAD = grpc.StatusCode.INVALID_ARGUMENT
Volume = volume_pb2.Volume
Snapshot = snapshot_pb2.Snapshot
Attachment = attachment_pb2.VolumeAttachment


def _with_service(codes: dict[str, grpc.StatusCode],
                  code: grpc.StatusCode = OK) -> dict[str, grpc.StatusCode]:
    return {**codes, "service": code}


def _operator_only(code: grpc.StatusCode = OK) -> dict[str, grpc.StatusCode]:
    """Cloud-admins and services; project roles are denied."""
    return _with_service({**cloud_only(), "cloud_admin": code}, code)


def _everyone(code: grpc.StatusCode) -> dict[str, grpc.StatusCode]:
    return expect(cloud_admin=code, a_admin=code, a_member=code, a_reader=code, b_admin=code)


async def _volume_in_a(world: World, state: int = Volume.AVAILABLE) -> Volume:
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=f"v-{uuid.uuid4().hex[:6]}"),
                                world.project_a)
    made = Volume(meta=meta, size_gb=1, node=NODE, pool_id=str(uuid.uuid4()),
                  pool_name="default-pool", libvirt_name=f"volume-{meta.id}", format="qcow2")
    made.state = state  # type: ignore[assignment]
    await world.store.create(keys.volume(meta.id), made)
    return made


async def _snapshot_in_a(world: World) -> Snapshot:
    source = await _volume_in_a(world)
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name="s"), world.project_a)
    made = Snapshot(meta=meta, state=Snapshot.AVAILABLE, volume_id=source.meta.id, size_gb=1,
                    node=NODE, pool_id=source.pool_id)
    await world.store.create(keys.snapshot(meta.id), made)
    return made


async def _attachment_in_a(world: World, state: int) -> Attachment:
    volume_states: dict[int, int] = {
        Attachment.RESERVED: Volume.RESERVED, Attachment.ATTACHING: Volume.ATTACHING,
        Attachment.ATTACHED: Volume.IN_USE, Attachment.DETACHING: Volume.DETACHING}
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name="a"), world.project_a)
    volume = await _volume_in_a(world, volume_states[state])
    made = Attachment(meta=meta, volume_id=volume.meta.id, instance_id=str(uuid.uuid4()),
                      node=NODE)
    made.state = state  # type: ignore[assignment]
    volume.attachments.add(attachment_id=meta.id, instance_id=made.instance_id)
    await world.store.create(keys.attachment(meta.id), made)
    await world.store.replace(keys.volume(volume.meta.id), volume,
                              expect_revision=(await world.store.get(
                                  keys.volume(volume.meta.id), Volume)).mod_revision)
    return made


def _named(volume: Volume) -> Volume:
    return Volume(meta=resource_pb2.ResourceMeta(id=volume.meta.id, name="renamed"))


async def _get(world: World) -> message.Message:
    return volume_pb2.GetVolumeRequest(id=(await _volume_in_a(world)).meta.id)


async def _list(world: World) -> message.Message:
    await _volume_in_a(world)
    return volume_pb2.ListVolumesRequest(page_size=1000)


def _no_foreign_volume(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, volume_pb2.ListVolumesResponse)
    own = {"a_admin": world.project_a, "a_member": world.project_a, "a_reader": world.project_a,
           "b_admin": world.project_b}.get(caller)
    if own is not None:
        assert all(item.meta.project_id == own for item in reply.volumes), caller
        assert all(not item.node for item in reply.volumes), "placement shown to a project"


async def _list_all(world: World) -> message.Message:
    return volume_pb2.ListVolumesRequest(all_projects=True, page_size=5)


async def _create_bad(world: World) -> message.Message:
    return volume_pb2.CreateVolumeRequest(volume=Volume(
        meta=resource_pb2.ResourceMeta(name="too-big"), size_gb=0))


async def _update(world: World) -> message.Message:
    return volume_pb2.UpdateVolumeRequest(volume=_named(await _volume_in_a(world)),
                                          update_mask=field_mask_pb2.FieldMask(paths=["meta.name"]))


async def _delete(world: World) -> message.Message:
    return volume_pb2.DeleteVolumeRequest(id=(await _volume_in_a(world)).meta.id)


async def _extend(world: World) -> message.Message:
    return volume_pb2.ExtendVolumeRequest(id=(await _volume_in_a(world)).meta.id, new_size_gb=2)


async def _reset(world: World) -> message.Message:
    return volume_pb2.ResetVolumeStateRequest(id=(await _volume_in_a(world)).meta.id,
                                              state=Volume.ERROR)


async def _watch_bad(world: World) -> message.Message:
    return volume_pb2.WatchVolumesRequest(filter="no-such-key=1")


async def _watch_all_bad(world: World) -> message.Message:
    request = await _watch_bad(world)
    assert isinstance(request, volume_pb2.WatchVolumesRequest)
    request.options.all_projects = True
    return request


async def _root_disk_bad(world: World) -> message.Message:
    return volume_pb2.CreateRootDiskRequest(instance_id=str(uuid.uuid4()),
                                            project_id=world.project_a,
                                            image_id=str(uuid.uuid4()), node=NODE, size_gb=0)


async def _get_snapshot(world: World) -> message.Message:
    return snapshot_pb2.GetSnapshotRequest(id=(await _snapshot_in_a(world)).meta.id)


async def _list_snapshots(world: World) -> message.Message:
    await _snapshot_in_a(world)
    return snapshot_pb2.ListSnapshotsRequest(page_size=1000)


async def _create_snapshot(world: World) -> message.Message:
    source = await _volume_in_a(world)
    return snapshot_pb2.CreateSnapshotRequest(snapshot=Snapshot(
        meta=resource_pb2.ResourceMeta(name="snap"), volume_id=source.meta.id))


async def _update_snapshot(world: World) -> message.Message:
    found = await _snapshot_in_a(world)
    return snapshot_pb2.UpdateSnapshotRequest(
        snapshot=Snapshot(meta=resource_pb2.ResourceMeta(id=found.meta.id, name="renamed")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.name"]))


async def _delete_snapshot(world: World) -> message.Message:
    return snapshot_pb2.DeleteSnapshotRequest(id=(await _snapshot_in_a(world)).meta.id)


async def _get_attachment(world: World) -> message.Message:
    found = await _attachment_in_a(world, Attachment.ATTACHED)
    return attachment_pb2.GetVolumeAttachmentRequest(id=found.meta.id)


async def _list_attachments(world: World) -> message.Message:
    await _attachment_in_a(world, Attachment.ATTACHED)
    return attachment_pb2.ListVolumeAttachmentsRequest(page_size=1000)


async def _reserve(world: World) -> message.Message:
    return attachment_pb2.ReserveVolumeRequest(volume_id=(await _volume_in_a(world)).meta.id,
                                               instance_id=str(uuid.uuid4()), node=NODE)


async def _begin_attach(world: World) -> message.Message:
    found = await _attachment_in_a(world, Attachment.RESERVED)
    return attachment_pb2.BeginAttachRequest(attachment_id=found.meta.id, device_name="vdb")


async def _complete_attach(world: World) -> message.Message:
    found = await _attachment_in_a(world, Attachment.ATTACHING)
    return attachment_pb2.CompleteAttachRequest(attachment_id=found.meta.id)


async def _begin_detach(world: World) -> message.Message:
    found = await _attachment_in_a(world, Attachment.ATTACHED)
    return attachment_pb2.BeginDetachRequest(attachment_id=found.meta.id)


async def _complete_detach(world: World) -> message.Message:
    found = await _attachment_in_a(world, Attachment.DETACHING)
    return attachment_pb2.CompleteDetachRequest(attachment_id=found.meta.id)


async def _get_pool_bad(world: World) -> message.Message:
    return pool_pb2.GetStoragePoolRequest(id="not-a-uuid")


async def _list_pools_bad(world: World) -> message.Message:
    return pool_pb2.ListStoragePoolsRequest(filter="no-such-key=1")


async def _create_pool_bad(world: World) -> message.Message:
    return pool_pb2.CreateStoragePoolRequest(storage_pool=pool_pb2.StoragePool(
        meta=resource_pb2.ResourceMeta(name="extra"), node=NODE, path="relative/dir"))


async def _update_pool_bad(world: World) -> message.Message:
    return pool_pb2.UpdateStoragePoolRequest(
        storage_pool=pool_pb2.StoragePool(meta=resource_pb2.ResourceMeta(id=str(uuid.uuid4()))),
        update_mask=field_mask_pb2.FieldMask(paths=["path"]))


async def _delete_pool_bad(world: World) -> message.Message:
    return pool_pb2.DeleteStoragePoolRequest(id="not-a-uuid")


add_rows(
    Row(SERVICE, "GetVolume", _get, _with_service(project_read())),
    Row(SERVICE, "ListVolumes", _list, expect(), check=_no_foreign_volume),
    Row(SERVICE, "ListVolumes", _list_all, cloud_only(), case="all_projects"),
    Row(SERVICE, "CreateVolume", _create_bad,
        expect(cloud_admin=BAD, a_admin=BAD, a_member=BAD, a_reader=DENIED, b_admin=BAD),
        case="size 0"),
    Row(SERVICE, "UpdateVolume", _update, project_write()),
    Row(SERVICE, "DeleteVolume", _delete, _with_service(project_write())),
    Row(SERVICE, "ExtendVolume", _extend, project_write()),
    Row(SERVICE, "ResetVolumeState", _reset, cloud_only()),
    Row(SERVICE, "WatchVolumes", _watch_bad, _everyone(BAD), case="bad filter"),
    Row(SERVICE, "WatchVolumes", _watch_all_bad,
        expect(cloud_admin=BAD, a_admin=DENIED, a_member=DENIED, a_reader=DENIED,
               b_admin=DENIED), case="all_projects"),
    Row(SERVICE, "CreateRootDisk", _root_disk_bad, _operator_only(BAD), case="size 0"),
    Row(SERVICE, "GetSnapshot", _get_snapshot, project_read()),
    Row(SERVICE, "ListSnapshots", _list_snapshots, expect()),
    Row(SERVICE, "CreateSnapshot", _create_snapshot, project_write()),
    Row(SERVICE, "UpdateSnapshot", _update_snapshot, project_write()),
    Row(SERVICE, "DeleteSnapshot", _delete_snapshot, project_write()),
    Row(SERVICE, "GetVolumeAttachment", _get_attachment, _with_service(project_read())),
    Row(SERVICE, "ListVolumeAttachments", _list_attachments, _with_service(expect())),
    Row(SERVICE, "ReserveVolume", _reserve, _operator_only()),
    Row(SERVICE, "BeginAttach", _begin_attach, _operator_only()),
    Row(SERVICE, "CompleteAttach", _complete_attach, _operator_only()),
    Row(SERVICE, "BeginDetach", _begin_detach, _operator_only()),
    Row(SERVICE, "CompleteDetach", _complete_detach, _operator_only()),
    Row(SERVICE, "GetStoragePool", _get_pool_bad, _operator_only(BAD), case="bad id"),
    Row(SERVICE, "ListStoragePools", _list_pools_bad, _operator_only(BAD), case="bad filter"),
    Row(SERVICE, "CreateStoragePool", _create_pool_bad, {**cloud_only(), "cloud_admin": BAD},
        case="relative path"),
    Row(SERVICE, "UpdateStoragePool", _update_pool_bad, {**cloud_only(), "cloud_admin": BAD},
        case="immutable path"),
    Row(SERVICE, "DeleteStoragePool", _delete_pool_bad, {**cloud_only(), "cloud_admin": BAD},
        case="bad id"),
)

