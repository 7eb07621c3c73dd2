"""An in-process nubis-storage on the session etcd and Redis, beside identity's test world.

`running_storage` starts identity with the authorization world's projects and
callers (project A: admin, member, reader; project B: admin; a cloud-admin; a
`service` user) and a storage service that verifies the same tokens, with its
image directory in a temporary directory. `StorageWorld` calls it as any of
them, and has helpers for images: create, upload (streamed in chunks, with
the declared size and checksum), download, and files made by qemu-img.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.common.settings import ServiceEndpoint, Settings
from services.common.store import Store
from services.storage import image_store, main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.authz.world import (
    Service,
    World,
    running_one_service,
    start_service,
)

SERVICE = "nubis.storage.v1.StorageService"
MIB = 1 << 20
Format = image_pb2.Image.DiskFormat


@dataclass
class StorageWorld:
    """Identity's world plus one storage service and a channel to it."""

    world: World
    service: Service
    channel: grpc.aio.Channel

    @property
    def store(self) -> Store:
        return self.world.store

    @property
    def settings(self) -> Settings:
        return self.world.settings

    @property
    def stub(self) -> storage_service_pb2_grpc.StorageServiceAsyncStub:
        return storage_service_pb2_grpc.StorageServiceStub(self.channel)

    @property
    def image_dir(self) -> Path:
        return Path(self.settings.storage.image_dir)

    @property
    def bytes_store(self) -> image_store.DirectoryImageStore:
        return image_store.DirectoryImageStore(self.image_dir)

    def as_(self, caller: str) -> tuple[tuple[str, str], ...]:
        """Call metadata of one of the world's callers (a_member, cloud_admin, service...)."""
        return self.world.metadata(caller)

    def files_of(self, image_id: str) -> list[Path]:
        """Every file the image store holds for the image, staging files included."""
        found = [self.bytes_store.path(image_id)] if self.bytes_store.path(image_id).exists() \
            else []
        return found + self.bytes_store.staged_files(image_id)

    async def create_image(self, caller: str = "a_member", *, name: str = "",
                           disk_format: int = Format.DISK_FORMAT_RAW,
                           **fields: Any) -> image_pb2.Image:
        made = image_pb2.Image(meta=resource_pb2.ResourceMeta(
            name=name or f"img-{uuid.uuid4().hex[:8]}"), **fields)
        made.disk_format = disk_format  # type: ignore[assignment]
        reply: image_pb2.Image = await self.stub.CreateImage(
            image_pb2.CreateImageRequest(image=made), metadata=self.as_(caller))
        return reply

    async def upload(self, image_id: str, data: bytes, caller: str = "a_member", *,
                     size: int | None = None, checksum: str | None = None,
                     chunk: int = MIB) -> image_pb2.Image:
        """Stream `data` in `chunk`-byte pieces, declaring its size and sha256 (or those given)."""
        header = image_pb2.ImageUploadHeader(
            image_id=image_id, size_bytes=len(data) if size is None else size,
            checksum_sha256=hashlib.sha256(data).hexdigest() if checksum is None else checksum)
        reply: image_pb2.Image = await self.stub.UploadImage(
            upload_messages(header, data, chunk), metadata=self.as_(caller))
        return reply

    async def download(self, image_id: str, caller: str = "a_member",
                       offset: int = 0) -> tuple[image_pb2.Image, bytes]:
        """The record the stream starts with, and every byte after it."""
        record = image_pb2.Image()
        parts: list[bytes] = []
        call = self.stub.DownloadImage(image_pb2.DownloadImageRequest(id=image_id, offset=offset),
                                       metadata=self.as_(caller))
        async for message in call:
            if message.WhichOneof("part") == "image":
                record = message.image
            else:
                parts.append(message.chunk)
        return record, b"".join(parts)

    async def active_image(self, data: bytes, caller: str = "a_member", *,
                           disk_format: int = Format.DISK_FORMAT_RAW,
                           **fields: Any) -> image_pb2.Image:
        """An image created and uploaded with `data`: ACTIVE."""
        made = await self.create_image(caller, disk_format=disk_format, **fields)
        return await self.upload(made.meta.id, data, caller)


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if it carries none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


def upload_messages(header: image_pb2.ImageUploadHeader, data: bytes,
                    chunk: int = MIB) -> Iterator[image_pb2.UploadImageRequest]:
    yield image_pb2.UploadImageRequest(header=header)
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        yield image_pb2.UploadImageRequest(chunk=bytes(view[start:start + chunk]))


def qcow2_bytes(directory: Path, virtual_size: str = "16M",
                options: Sequence[str] = ()) -> bytes:
    """A fresh qcow2 image made by qemu-img (a few hundred KiB)."""
    path = directory / f"made-{uuid.uuid4().hex[:8]}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *options, str(path),
                    virtual_size], check=True)
    try:
        return path.read_bytes()
    finally:
        path.unlink()


def raw_bytes(size: int, seed: int = 7) -> bytes:
    """`size` bytes of no disk format qemu-img knows (probed as raw)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


async def start_storage(world: World, store: Store | None = None) -> Service:
    """One more storage replica on the world's settings (its own store connection if given)."""
    return await start_service(main.build, store or world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


@contextlib.asynccontextmanager
async def running_storage(etcd_endpoint: str, redis_url: str,
                          directory: Path) -> AsyncIterator[StorageWorld]:
    """Identity's world and a storage service on a fresh etcd prefix; stopped on exit."""
    async with running_one_service(main.build, SERVICE, "test-storage", etcd_endpoint,
                                   redis_url, directory) as (world, service, channel):
        yield StorageWorld(world, service, channel)


@pytest.fixture(scope="package")
async def storage(etcd: EtcdEndpoint, redis: RedisEndpoint,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[StorageWorld]:
    """Identity's callers and one storage service, once per package (see `running_storage`)."""
    async with running_storage(etcd.endpoint, redis.url,
                               tmp_path_factory.mktemp("storage")) as built:
        yield built
