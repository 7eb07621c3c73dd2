"""StorageService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. RPCs not written
yet fall through to the generated base and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nubis.storage.v1 import (
    attachment_pb2,
    image_pb2,
    pool_pb2,
    snapshot_pb2,
    storage_service_pb2_grpc,
    volume_pb2,
)

from services.client import peers
from services.common import context, policy
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.storage import (
    attachment,
    image,
    image_store,
    image_upload,
    operation,
    pool,
    snapshot,
    volume,
    volume_ops,
)

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


def _sees_everything(caller: context.Principal | None) -> bool:
    """Cloud-admins and other nubis services (compute) act on any project's volumes."""
    return caller is None or policy.is_cloud_admin(caller) or policy.is_service(caller)


def _check_visible(project_id: str, kind: str, resource_id: str) -> None:
    caller = _caller()
    if not _sees_everything(caller):
        assert caller is not None
        policy.require_visible(caller, project_id, kind, resource_id)


def _volume_visible(found: volume_pb2.Volume) -> None:
    _check_visible(found.meta.project_id, "volume", found.meta.id)


def _snapshot_visible(found: snapshot_pb2.Snapshot) -> None:
    _check_visible(found.meta.project_id, "snapshot", found.meta.id)


def _shown_volume(found: volume_pb2.Volume) -> volume_pb2.Volume:
    """Where a volume lives (node, pool, path) is shown to operators and services only."""
    return found if _sees_everything(_caller()) else volume.redact(found)


def _shown_snapshot(found: snapshot_pb2.Snapshot) -> snapshot_pb2.Snapshot:
    return found if _sees_everything(_caller()) else snapshot.redact(found)


def _scope(all_projects: bool) -> str | None:
    caller = _caller()
    return None if caller is None else policy.list_scope(caller, all_projects=all_projects)


def _admin() -> bool:
    caller = _caller()
    return caller is None or policy.is_cloud_admin(caller)


def _project() -> str:
    caller = _caller()
    return caller.project_id if caller is not None else ""


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    """The storage API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients, runner: operation.Runner | None = None) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients
        # Image bytes: the directory backend (shared by every replica), created if missing.
        self.images = image_upload.Transfer(
            image_store.directory_store(settings.storage.image_dir,
                                        sync=settings.storage.sync_images),
            settings.storage)
        if runner is None:
            runner = operation.Runner(store, sender, clients, settings.storage)
            volume_ops.register(runner)
            snapshot.register(runner)
        self._runner = runner

    # --- storage pools ---

    async def GetStoragePool(self, request: pool_pb2.GetStoragePoolRequest,
                             ctx: Ctx) -> pool_pb2.StoragePool:
        return await pool.get(self._store, self._clients, request.id)

    async def ListStoragePools(self, request: pool_pb2.ListStoragePoolsRequest,
                               ctx: Ctx) -> pool_pb2.ListStoragePoolsResponse:
        page, token = await pool.list_pools(self._store, self._clients, request)
        return pool_pb2.ListStoragePoolsResponse(storage_pools=page, next_page_token=token)

    async def CreateStoragePool(self, request: pool_pb2.CreateStoragePoolRequest,
                                ctx: Ctx) -> pool_pb2.StoragePool:
        return await pool.create(self._store, self._clients, self._sender, request)

    async def UpdateStoragePool(self, request: pool_pb2.UpdateStoragePoolRequest,
                                ctx: Ctx) -> pool_pb2.StoragePool:
        return await pool.update(self._store, self._clients, request)

    async def DeleteStoragePool(self, request: pool_pb2.DeleteStoragePoolRequest,
                                ctx: Ctx) -> pool_pb2.DeleteStoragePoolResponse:
        await pool.delete(self._store, self._clients, request)
        return pool_pb2.DeleteStoragePoolResponse()

    # --- volumes ---

    async def GetVolume(self, request: volume_pb2.GetVolumeRequest,
                        ctx: Ctx) -> volume_pb2.Volume:
        found = await volume.fetch(self._store, request.id)
        _volume_visible(found)
        return _shown_volume(found)

    async def ListVolumes(self, request: volume_pb2.ListVolumesRequest,
                          ctx: Ctx) -> volume_pb2.ListVolumesResponse:
        page, token = await volume.list_volumes(self._store, _scope(request.all_projects),
                                                request, admin=_admin())
        return volume_pb2.ListVolumesResponse(volumes=[_shown_volume(v) for v in page],
                                              next_page_token=token)

    async def CreateVolume(self, request: volume_pb2.CreateVolumeRequest,
                           ctx: Ctx) -> volume_pb2.Volume:
        caller = _caller()
        made = await volume.create(self._runner, request, _project(),
                                   caller.user_id if caller is not None else "", admin=_admin())
        return _shown_volume(made)

    async def UpdateVolume(self, request: volume_pb2.UpdateVolumeRequest,
                           ctx: Ctx) -> volume_pb2.Volume:
        return _shown_volume(await volume.update(self._store, request, _volume_visible))

    async def DeleteVolume(self, request: volume_pb2.DeleteVolumeRequest,
                           ctx: Ctx) -> volume_pb2.Volume:
        found = await volume.delete(self._runner, request, _volume_visible, admin=_admin())
        return _shown_volume(found)

    async def ExtendVolume(self, request: volume_pb2.ExtendVolumeRequest,
                           ctx: Ctx) -> volume_pb2.Volume:
        return _shown_volume(await volume.extend(self._runner, request, _volume_visible))

    async def ResetVolumeState(self, request: volume_pb2.ResetVolumeStateRequest,
                               ctx: Ctx) -> volume_pb2.Volume:
        return await volume.reset_state(self._store, request)

    async def WatchVolumes(self, request: volume_pb2.WatchVolumesRequest,
                           ctx: Ctx) -> AsyncIterator[volume_pb2.VolumeEvent]:
        scope = _scope(request.options.all_projects)
        async for event in volume.watch(self._store, scope, request, admin=_admin()):
            if event.HasField("volume"):
                _shown_volume(event.volume)
            yield event

    async def CreateRootDisk(self, request: volume_pb2.CreateRootDiskRequest,
                             ctx: Ctx) -> volume_pb2.Volume:
        return await volume.create_root_disk(self._runner, request)

    # --- snapshots ---

    async def GetSnapshot(self, request: snapshot_pb2.GetSnapshotRequest,
                          ctx: Ctx) -> snapshot_pb2.Snapshot:
        found = await snapshot.fetch(self._store, request.id)
        _snapshot_visible(found)
        return _shown_snapshot(found)

    async def ListSnapshots(self, request: snapshot_pb2.ListSnapshotsRequest,
                            ctx: Ctx) -> snapshot_pb2.ListSnapshotsResponse:
        page, token = await snapshot.list_snapshots(self._store, _scope(request.all_projects),
                                                    request, admin=_admin())
        return snapshot_pb2.ListSnapshotsResponse(snapshots=[_shown_snapshot(s) for s in page],
                                                  next_page_token=token)

    async def CreateSnapshot(self, request: snapshot_pb2.CreateSnapshotRequest,
                             ctx: Ctx) -> snapshot_pb2.Snapshot:
        made = await snapshot.create(self._runner, request, _project(), _volume_visible)
        return _shown_snapshot(made)

    async def UpdateSnapshot(self, request: snapshot_pb2.UpdateSnapshotRequest,
                             ctx: Ctx) -> snapshot_pb2.Snapshot:
        return _shown_snapshot(await snapshot.update(self._store, request, _snapshot_visible))

    async def DeleteSnapshot(self, request: snapshot_pb2.DeleteSnapshotRequest,
                             ctx: Ctx) -> snapshot_pb2.Snapshot:
        found = await snapshot.delete(self._runner, request, _snapshot_visible, admin=_admin())
        return _shown_snapshot(found)

    # --- volume attachments ---

    async def GetVolumeAttachment(self, request: attachment_pb2.GetVolumeAttachmentRequest,
                                  ctx: Ctx) -> attachment_pb2.VolumeAttachment:
        found = await attachment.fetch(self._store, request.id)
        _check_visible(found.meta.project_id, "volume attachment", found.meta.id)
        return found

    async def ListVolumeAttachments(
        self, request: attachment_pb2.ListVolumeAttachmentsRequest, ctx: Ctx
    ) -> attachment_pb2.ListVolumeAttachmentsResponse:
        page, token = await attachment.list_attachments(
            self._store, _scope(request.all_projects), request)
        return attachment_pb2.ListVolumeAttachmentsResponse(volume_attachments=page,
                                                            next_page_token=token)

    async def ReserveVolume(self, request: attachment_pb2.ReserveVolumeRequest,
                            ctx: Ctx) -> attachment_pb2.VolumeAttachment:
        return await attachment.reserve(self._store, request, _volume_visible)

    async def BeginAttach(self, request: attachment_pb2.BeginAttachRequest,
                          ctx: Ctx) -> attachment_pb2.VolumeAttachment:
        return await attachment.begin_attach(self._store, request, _volume_visible)

    async def CompleteAttach(self, request: attachment_pb2.CompleteAttachRequest,
                             ctx: Ctx) -> attachment_pb2.VolumeAttachment:
        return await attachment.complete_attach(self._store, request, _volume_visible)

    async def BeginDetach(self, request: attachment_pb2.BeginDetachRequest,
                          ctx: Ctx) -> attachment_pb2.VolumeAttachment:
        return await attachment.begin_detach(self._store, request, _volume_visible)

    async def CompleteDetach(self, request: attachment_pb2.CompleteDetachRequest,
                             ctx: Ctx) -> volume_pb2.Volume:
        return await attachment.complete_detach(self._store, request, _volume_visible)

    # --- images ---

    async def GetImage(self, request: image_pb2.GetImageRequest, ctx: Ctx) -> image_pb2.Image:
        return await image.get(self._store, _caller(), request.id)

    async def ListImages(self, request: image_pb2.ListImagesRequest,
                         ctx: Ctx) -> image_pb2.ListImagesResponse:
        page, token = await image.list_images(self._store, _caller(), request)
        return image_pb2.ListImagesResponse(images=page, next_page_token=token)

    async def CreateImage(self, request: image_pb2.CreateImageRequest,
                          ctx: Ctx) -> image_pb2.Image:
        caller = _caller()
        requested = request.image.meta.project_id
        project_id = requested if caller is None else policy.target_project(
            caller, requested, "project")
        return await image.create(self._store, caller, request, project_id)

    async def UpdateImage(self, request: image_pb2.UpdateImageRequest,
                          ctx: Ctx) -> image_pb2.Image:
        return await image.update(self._store, _caller(), request)

    async def DeleteImage(self, request: image_pb2.DeleteImageRequest,
                          ctx: Ctx) -> image_pb2.DeleteImageResponse:
        await image.delete(self._store, self.images.bytes_store, _caller(), request.id,
                           request.revision)
        return image_pb2.DeleteImageResponse()

    async def UploadImage(self, request_iterator: Any, ctx: Ctx) -> image_pb2.Image:
        return await image_upload.upload(self._store, self.images, _caller(), request_iterator)

    async def DownloadImage(  # type: ignore[override]  # chunks go out encoded (image_upload)
            self, request: image_pb2.DownloadImageRequest,
            ctx: Ctx) -> AsyncIterator[image_pb2.DownloadImageResponse | bytes]:
        parts = await image_upload.download(self._store, self.images, _caller(), request)
        async for part in parts:
            yield part

    async def AddImageMember(self, request: image_pb2.ImageMemberRequest,
                             ctx: Ctx) -> image_pb2.Image:
        return await image.change_member(self._store, _caller(), request, add=True)

    async def RemoveImageMember(self, request: image_pb2.ImageMemberRequest,
                                ctx: Ctx) -> image_pb2.Image:
        return await image.change_member(self._store, _caller(), request, add=False)
