"""Images over the real API: uploads verified or refused leaving nothing, downloads, kernel boot."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.common import errors, resources
from services.common.settings import ServiceEndpoint
from services.common.store import Txn
from services.storage import image, image_upload, keys, main
from tests.functional.authz.world import start_service
from tests.functional.storage.harness import (
    MIB,
    Format,
    StorageWorld,
    qcow2_bytes,
    raw_bytes,
    reason_of,
)

State = image_pb2.Image.State


async def _state(storage: StorageWorld, image_id: str) -> image_pb2.Image:
    found: image_pb2.Image = await storage.stub.GetImage(
        image_pb2.GetImageRequest(id=image_id), metadata=storage.as_("a_member"))
    return found


async def test_upload_then_download_round_trip(storage: StorageWorld) -> None:
    data = raw_bytes(3 * MIB + 12345)
    made = await storage.create_image(properties={"os_distro": "debian"})
    assert made.state == State.QUEUED
    done = await storage.upload(made.meta.id, data)
    assert (done.state, done.size_bytes, done.checksum_sha256) == (
        State.ACTIVE, len(data), hashlib.sha256(data).hexdigest())
    # qemu-img counts a raw disk in whole 512-byte sectors.
    assert done.virtual_size_bytes == -(-len(data) // 512) * 512
    record, back = await storage.download(made.meta.id)
    assert back == data and record.checksum_sha256 == done.checksum_sha256
    _, tail = await storage.download(made.meta.id, offset=MIB + 7)
    assert tail == data[MIB + 7:]
    assert storage.files_of(made.meta.id) == [storage.bytes_store.path(made.meta.id)]


async def test_qcow2_upload_reports_its_virtual_size(storage: StorageWorld,
                                                     tmp_path: Path) -> None:
    data = qcow2_bytes(tmp_path, "64M")
    done = await storage.active_image(data, disk_format=Format.DISK_FORMAT_QCOW2)
    assert done.state == State.ACTIVE
    assert done.virtual_size_bytes == 64 * MIB and done.size_bytes == len(data)


async def test_wrong_checksum_is_refused_leaving_no_bytes(storage: StorageWorld) -> None:
    data = raw_bytes(2 * MIB)
    made = await storage.create_image()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(made.meta.id, data, checksum="0" * 64)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == image_upload.CHECKSUM_MISMATCH
    failed = await _state(storage, made.meta.id)
    assert failed.state == State.ERROR and failed.fault.reason == image_upload.CHECKSUM_MISMATCH
    assert not failed.checksum_sha256 and not failed.size_bytes
    assert storage.files_of(made.meta.id) == []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await storage.download(made.meta.id)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The same image takes a good upload afterwards.
    assert (await storage.upload(made.meta.id, data)).state == State.ACTIVE


@pytest.mark.parametrize(("declared", "reason"), [
    (MIB, image_upload.SIZE_MISMATCH),          # more bytes than declared
    (4 * MIB, image_upload.SIZE_MISMATCH),      # the stream ended short
])
async def test_size_other_than_declared_is_refused(storage: StorageWorld, declared: int,
                                                   reason: str) -> None:
    made = await storage.create_image()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(made.meta.id, raw_bytes(2 * MIB), size=declared, checksum="")
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert (await _state(storage, made.meta.id)).state == State.ERROR
    assert storage.files_of(made.meta.id) == []


async def test_chunk_over_one_mib_is_refused(storage: StorageWorld) -> None:
    made = await storage.create_image()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(made.meta.id, raw_bytes(2 * MIB), chunk=2 * MIB)
    assert reason_of(caught.value) == image_upload.BAD_STREAM
    assert storage.files_of(made.meta.id) == []


async def test_cut_stream_leaves_nothing_behind(storage: StorageWorld) -> None:
    made = await storage.create_image()
    sent = asyncio.Event()

    async def messages() -> AsyncIterator[image_pb2.UploadImageRequest]:
        yield image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id=made.meta.id, size_bytes=10 * MIB))
        for index in range(3):
            yield image_pb2.UploadImageRequest(chunk=raw_bytes(MIB, seed=index))
        sent.set()
        await asyncio.sleep(3600)  # the client dies here

    call = storage.stub.UploadImage(messages(), metadata=storage.as_("a_member"))
    await sent.wait()

    async def saving_with_bytes() -> bool:
        return (await _state(storage, made.meta.id)).state == State.SAVING \
            and bool(storage.files_of(made.meta.id))

    await _until(saving_with_bytes)
    call.cancel()

    async def settled() -> bool:
        return (await _state(storage, made.meta.id)).state == State.QUEUED
    await _until(settled)
    assert storage.files_of(made.meta.id) == []
    assert await storage.store.find(keys.image_upload(made.meta.id),
                                    image_pb2.ImageUpload) is None
    assert (await storage.upload(made.meta.id, raw_bytes(MIB))).state == State.ACTIVE


async def _until(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110 - polling another process's writes
            await asyncio.sleep(0.05)


async def test_raw_bytes_declared_qcow2_are_refused(storage: StorageWorld) -> None:
    made = await storage.create_image(disk_format=Format.DISK_FORMAT_QCOW2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(made.meta.id, raw_bytes(MIB))
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, image_upload.FORMAT_MISMATCH)
    failed = await _state(storage, made.meta.id)
    assert failed.state == State.ERROR and failed.fault.reason == image_upload.FORMAT_MISMATCH
    assert storage.files_of(made.meta.id) == []


async def test_qcow2_declared_raw_and_qcow2_with_backing_file_are_refused(
        storage: StorageWorld, tmp_path: Path) -> None:
    as_raw = await storage.create_image(disk_format=Format.DISK_FORMAT_RAW)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(as_raw.meta.id, qcow2_bytes(tmp_path))
    assert reason_of(caught.value) == image_upload.FORMAT_MISMATCH
    backed = await storage.create_image(disk_format=Format.DISK_FORMAT_QCOW2)
    data = qcow2_bytes(tmp_path, options=["-u", "-b", "/etc/hostname", "-F", "raw"])
    with pytest.raises(grpc.aio.AioRpcError) as unsafe:
        await storage.upload(backed.meta.id, data)
    assert reason_of(unsafe.value) == image_upload.UNSAFE
    assert storage.files_of(as_raw.meta.id) == storage.files_of(backed.meta.id) == []


async def test_an_active_image_takes_no_second_upload(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.upload(done.meta.id, raw_bytes(MIB, seed=2))
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, image_upload.NOT_UPLOADABLE)
    _, back = await storage.download(done.meta.id)
    assert back == raw_bytes(MIB)


async def test_kernel_boot_image_parts_are_downloadable_and_verified(
        storage: StorageWorld, tmp_path: Path) -> None:
    kernel_bytes, ramdisk_bytes = raw_bytes(MIB + 5, seed=11), raw_bytes(300_000, seed=12)
    kernel = await storage.create_image(disk_format=Format.DISK_FORMAT_KERNEL)
    # A part that is not ACTIVE yet cannot be named.
    with pytest.raises(grpc.aio.AioRpcError) as early:
        await storage.create_image(disk_format=Format.DISK_FORMAT_QCOW2,
                                   kernel_image_id=kernel.meta.id)
    assert early.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await storage.upload(kernel.meta.id, kernel_bytes)
    ramdisk = await storage.active_image(ramdisk_bytes, disk_format=Format.DISK_FORMAT_RAMDISK)
    # A kernel is not a ramdisk.
    with pytest.raises(grpc.aio.AioRpcError) as swapped:
        await storage.create_image(kernel_image_id=kernel.meta.id,
                                   ramdisk_image_id=kernel.meta.id)
    assert swapped.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    disk = await storage.active_image(
        qcow2_bytes(tmp_path), disk_format=Format.DISK_FORMAT_QCOW2,
        kernel_image_id=kernel.meta.id, ramdisk_image_id=ramdisk.meta.id,
        kernel_cmdline="root=/dev/vda console=ttyS0")
    assert (disk.kernel_image_id, disk.ramdisk_image_id, disk.kernel_cmdline) == (
        kernel.meta.id, ramdisk.meta.id, "root=/dev/vda console=ttyS0")
    for part_id, expected in ((disk.kernel_image_id, kernel_bytes),
                              (disk.ramdisk_image_id, ramdisk_bytes)):
        record, data = await storage.download(part_id)
        assert hashlib.sha256(data).hexdigest() == record.checksum_sha256
        assert data == expected and len(data) == record.size_bytes
    # Parts are no disks, and stay while an image boots with them.
    with pytest.raises(errors.FailedPrecondition) as not_disk:
        await image.usable(storage.store, kernel.meta.project_id, kernel.meta.id)
    assert not_disk.value.reason == image.NOT_A_DISK
    with pytest.raises(grpc.aio.AioRpcError) as held:
        await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=kernel.meta.id),
                                       metadata=storage.as_("a_member"))
    assert (held.value.code(), reason_of(held.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, image.IN_USE)
    assert (await _state(storage, kernel.meta.id)).state == State.ACTIVE
    await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=disk.meta.id),
                                   metadata=storage.as_("a_member"))
    await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=kernel.meta.id),
                                   metadata=storage.as_("a_member"))
    assert storage.files_of(kernel.meta.id) == []


async def test_protected_image_cannot_be_deleted(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB), protected=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                       metadata=storage.as_("a_member"))
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, image.PROTECTED)
    assert storage.files_of(done.meta.id)
    unprotected = image_pb2.Image(protected=False)
    unprotected.meta.id = done.meta.id
    await storage.stub.UpdateImage(image_pb2.UpdateImageRequest(
        image=unprotected, update_mask=field_mask_pb2.FieldMask(paths=["protected"])),
        metadata=storage.as_("a_member"))
    await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                   metadata=storage.as_("a_member"))
    assert storage.files_of(done.meta.id) == []
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await _state(storage, done.meta.id)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def _volume_made_from(storage: StorageWorld, image_id: str, volume_id: str,
                            revision: int) -> None:
    """What a volume's create does for its image: hold it, comparing the revision read."""
    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        assert current is not None
        if current.mod_revision != revision:
            raise errors.FailedPrecondition("image changed", reason="test.image_changed")
        image.record_user(txn, image_id, image.USER_VOLUME, volume_id)

    await storage.store.atomic(body)


async def test_image_used_by_a_volume_cannot_be_deleted(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB))
    found, revision = await image.usable(storage.store, done.meta.project_id, done.meta.id)
    assert found.meta.id == done.meta.id
    volume_id = resources.new_id()
    await _volume_made_from(storage, done.meta.id, volume_id, revision)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                       metadata=storage.as_("a_member"))
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, image.IN_USE)
    restored = await _state(storage, done.meta.id)
    assert restored.state == State.ACTIVE and storage.files_of(done.meta.id)

    async def volume_gone(txn: Txn) -> None:
        image.drop_user(txn, done.meta.id, volume_id)

    await storage.store.atomic(volume_gone)
    await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                   metadata=storage.as_("a_member"))
    assert storage.files_of(done.meta.id) == []


async def test_volume_create_racing_a_delete_loses_its_compare(storage: StorageWorld) -> None:
    """The delete's mark bumps the revision `usable` returned: the racing create must fail."""
    done = await storage.active_image(raw_bytes(MIB))
    _, revision = await image.usable(storage.store, done.meta.project_id, done.meta.id)
    await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                   metadata=storage.as_("a_member"))
    with pytest.raises((AssertionError, errors.FailedPrecondition)):
        await _volume_made_from(storage, done.meta.id, resources.new_id(), revision)
    assert await storage.store.find(keys.image_user(done.meta.id, "x"), image_pb2.ImageUser) \
        is None


async def test_saving_image_of_a_dead_replica_goes_back_to_queued(
        storage: StorageWorld) -> None:
    made = await storage.create_image()
    stuck = await image.fetch(storage.store, made.meta.id)
    stuck.state = State.SAVING
    stuck.meta.revision = 0
    await storage.store.replace(keys.image(made.meta.id), stuck,
                                expect_revision=(await image.fetch(
                                    storage.store, made.meta.id)).meta.revision)
    assert await image_upload.recover_uploads(storage.store) >= 1
    assert (await _state(storage, made.meta.id)).state == State.QUEUED


async def test_an_upload_that_goes_idle_is_abandoned(storage: StorageWorld) -> None:
    settings = storage.settings.model_copy(deep=True)
    settings.storage.upload_idle_timeout = 0.5
    replica = await start_service(main.build, storage.store, settings,
                                  ServiceEndpoint(host="127.0.0.1", port=0))
    channel = make_channel(replica.running.address, policy=CallPolicy(max_attempts=1))
    made = await storage.create_image()

    async def messages() -> AsyncIterator[image_pb2.UploadImageRequest]:
        yield image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id=made.meta.id))
        yield image_pb2.UploadImageRequest(chunk=raw_bytes(MIB))
        await asyncio.sleep(30)  # alive, but sending nothing

    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await storage_service_pb2_grpc.StorageServiceStub(channel).UploadImage(
                messages(), metadata=storage.as_("a_member"))
    finally:
        await channel.close()
        await replica.stop()
    assert (caught.value.code(), reason_of(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, image_upload.BAD_STREAM)
    assert (await _state(storage, made.meta.id)).state == State.QUEUED
    assert storage.files_of(made.meta.id) == []


async def test_one_upload_at_a_time_per_image(storage: StorageWorld) -> None:
    made = await storage.create_image()
    started = asyncio.Event()

    async def slow() -> AsyncIterator[image_pb2.UploadImageRequest]:
        yield image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id=made.meta.id))
        yield image_pb2.UploadImageRequest(chunk=raw_bytes(MIB))
        started.set()
        await asyncio.sleep(3600)

    first = storage.stub.UploadImage(slow(), metadata=storage.as_("a_member"))
    await started.wait()

    async def saving() -> bool:
        return (await _state(storage, made.meta.id)).state == State.SAVING

    await _until(saving)
    with pytest.raises(grpc.aio.AioRpcError) as second:
        await storage.upload(made.meta.id, raw_bytes(MIB, seed=3))
    assert (second.value.code(), reason_of(second.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, image_upload.UPLOAD_IN_PROGRESS)
    first.cancel()

    async def queued() -> bool:
        return (await _state(storage, made.meta.id)).state == State.QUEUED

    await _until(queued)
    assert (await storage.upload(made.meta.id, raw_bytes(MIB, seed=3))).state == State.ACTIVE
