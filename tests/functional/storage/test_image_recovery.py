"""Images left mid-operation by a storage replica that died are given back, not left stuck.

A replica killed (SIGKILL) while an upload streams into it leaves the image
SAVING and a staging file; once its upload lease lapses, the next replica's
recovery puts the image back in QUEUED and the next upload clears the file.
A delete cut short after its mark is finished by the recovery loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import resources
from services.storage import image, image_upload, keys
from tests.functional.storage.harness import MIB, StorageWorld, raw_bytes

State = image_pb2.Image.State
LEASE_TTL = 2


def _storage_process(storage: StorageWorld, log: Path) -> tuple[daemons.Daemon, int]:
    port = daemons.free_port()
    settings = storage.settings
    env = {**os.environ, "NUBIS_ETCD__ENDPOINTS": json.dumps(settings.etcd.endpoints),
           "NUBIS_ETCD__PREFIX": settings.etcd.prefix, "NUBIS_REDIS_URL": settings.redis_url,
           "NUBIS_STORAGE__PORT": str(port), "NUBIS_STORAGE__METRICS_PORT": "0",
           "NUBIS_STORAGE__IMAGE_DIR": settings.storage.image_dir,
           "NUBIS_STORAGE__UPLOAD_LEASE_TTL": str(LEASE_TTL),
           "NUBIS_IDENTITY__PORT": str(settings.identity.port or 1),
           "NUBIS_LOG_LEVEL": "warning", "NUBIS_LOG_JSON": "false"}
    process = daemons.spawn("storage-replica", [sys.executable, "-m", "services.storage.main"],
                            log, env=env)
    daemons.wait_for_port("127.0.0.1", port, 30, process.proc, log)
    return process, port


async def _until(predicate: Callable[[], Awaitable[bool]], within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - polling another process's writes
            await asyncio.sleep(0.1)


async def test_upload_cut_by_a_killed_replica_is_given_back(storage: StorageWorld,
                                                            tmp_path: Path) -> None:
    made = await storage.create_image()
    process, port = _storage_process(storage, tmp_path / "storage.log")
    channel = make_channel(f"127.0.0.1:{port}", policy=CallPolicy(max_attempts=1))
    streamed = asyncio.Event()

    async def messages() -> AsyncIterator[image_pb2.UploadImageRequest]:
        yield image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id=made.meta.id, size_bytes=8 * MIB))
        for index in range(3):
            yield image_pb2.UploadImageRequest(chunk=raw_bytes(MIB, seed=index))
        streamed.set()
        await asyncio.sleep(3600)

    try:
        call = storage_service_pb2_grpc.StorageServiceStub(channel).UploadImage(
            messages(), metadata=storage.as_("a_member"))
        await streamed.wait()

        async def staged() -> bool:
            return bool(storage.bytes_store.staged_files(made.meta.id))

        await _until(staged)
        process.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await call
    finally:
        await channel.close()
        process.stop()
    stuck = await image.fetch(storage.store, made.meta.id)
    assert stuck.state == State.SAVING and storage.bytes_store.staged_files(made.meta.id)

    async def lease_gone() -> bool:
        return await storage.store.find(keys.image_upload(made.meta.id),
                                        image_pb2.ImageUpload) is None

    await _until(lease_gone)
    # What every replica's recovery loop runs (at its start, then every 30 s).
    assert await image_upload.recover_uploads(storage.store) >= 1
    assert (await image.fetch(storage.store, made.meta.id)).state == State.QUEUED
    done = await storage.upload(made.meta.id, raw_bytes(2 * MIB))
    assert done.state == State.ACTIVE
    assert storage.files_of(made.meta.id) == [storage.bytes_store.path(made.meta.id)]


async def test_delete_cut_after_its_mark_is_finished(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB))
    marked = await image.fetch(storage.store, done.meta.id)
    marked.state = State.DELETED
    marked.meta.update_time.seconds = resources.now().seconds - 2 * int(image.STALE_MARK_SECONDS)
    marked.meta.revision = 0
    await storage.store.replace(keys.image(done.meta.id), marked,
                                expect_revision=done.meta.revision)
    assert await image.recover_deletes(storage.store, storage.bytes_store) >= 1
    assert await storage.store.find(keys.image(done.meta.id), image_pb2.Image) is None
    assert storage.files_of(done.meta.id) == []


async def test_create_is_idempotent_and_validate_only_writes_nothing(
        storage: StorageWorld) -> None:
    request = image_pb2.CreateImageRequest(image=image_pb2.Image(
        disk_format=image_pb2.Image.DISK_FORMAT_QCOW2), request_id=f"r-{resources.new_id()}")
    request.image.meta.name = "once"
    first = await storage.stub.CreateImage(request, metadata=storage.as_("a_member"))
    again = await storage.stub.CreateImage(request, metadata=storage.as_("a_member"))
    assert first.meta.id == again.meta.id
    dry = image_pb2.CreateImageRequest(image=request.image, validate_only=True)
    checked = await storage.stub.CreateImage(dry, metadata=storage.as_("a_member"))
    assert checked.meta.id == "" and checked.state == State.QUEUED
