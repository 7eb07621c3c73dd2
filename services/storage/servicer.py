"""StorageService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. RPCs not written
yet fall through to the generated base and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client import peers
from services.common import context, policy
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.storage import image, image_store, image_upload

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    """The storage API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients
        # Image bytes: the directory backend (shared by every replica), created if missing.
        self.images = image_upload.Transfer(
            image_store.directory_store(settings.storage.image_dir), settings.storage)

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

    async def DownloadImage(self, request: image_pb2.DownloadImageRequest,
                            ctx: Ctx) -> AsyncIterator[image_pb2.DownloadImageResponse]:
        parts = await image_upload.download(self._store, self.images, _caller(), request)
        async for part in parts:
            yield part

    async def AddImageMember(self, request: image_pb2.ImageMemberRequest,
                             ctx: Ctx) -> image_pb2.Image:
        return await image.change_member(self._store, _caller(), request, add=True)

    async def RemoveImageMember(self, request: image_pb2.ImageMemberRequest,
                                ctx: Ctx) -> image_pb2.Image:
        return await image.change_member(self._store, _caller(), request, add=False)
