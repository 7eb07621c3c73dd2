"""Image bytes in and out: the UploadImage stream to a verified ACTIVE image, and downloads.

An upload runs in four steps. Begin: the image (QUEUED, ERROR, or SAVING by
a replica that died) moves to SAVING beside an upload record held under a
lease of this replica, kept alive while the stream runs. Stream: each chunk
goes straight to a staging file through the image store (hashed on the way;
never more than two chunks in memory), refused the moment it is over 1 MiB or
the stream passes the declared size or the size cap. Verify: size, SHA-256,
and the format `qemu-img info` reads in the bytes (a raw file declared qcow2
is refused; so is a qcow2 with a backing file or an external data file).
Commit: the file takes the image id's name, then the image becomes ACTIVE
and the upload record goes, in one transaction that checks the upload is
still this one.

Any failure leaves no bytes. Data that did not verify puts the image in ERROR
with a fault saying why; a stream that broke off (cancelled, cut, idle longer
than `upload_idle_timeout`) or a failure of ours puts it back in QUEUED. Both
can be uploaded again. A replica that dies mid-upload leaves the image SAVING
without an upload record once its lease lapses: the next upload takes it, and
`recover_uploads` (run periodically) puts it back in QUEUED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.common import errors, filtering, image_wire, resources
from services.common.context import Principal
from services.common.settings import StorageSettings
from services.common.store import Lease, Store, Txn
from services.storage import image, image_store, keys

State = image_pb2.Image.State
Format = image_pb2.Image.DiskFormat

log = structlog.get_logger(__name__)

MAX_CHUNK = image_wire.CHUNK_BYTES
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What `qemu-img info` must find in the bytes of each declared format.
_PROBED: dict[int, str] = {
    Format.DISK_FORMAT_QCOW2: "qcow2", Format.DISK_FORMAT_RAW: "raw",
    Format.DISK_FORMAT_KERNEL: "raw", Format.DISK_FORMAT_RAMDISK: "raw"}

CHECKSUM_MISMATCH = "nubis.image.checksum_mismatch"
SIZE_MISMATCH = "nubis.image.size_mismatch"
TOO_LARGE = "nubis.image.too_large"
FORMAT_MISMATCH = "nubis.image.format_mismatch"
UNSAFE = "nubis.image.unsafe"
EMPTY = "nubis.image.empty"
BAD_STREAM = "nubis.image.bad_stream"
NOT_UPLOADABLE = "nubis.image.not_uploadable"
UPLOAD_IN_PROGRESS = "nubis.image.upload_in_progress"


class _Rejected(errors.InvalidArgument):
    """The bytes (or the stream's shape) did not verify: the image goes to ERROR."""


def _idle(timeout: float) -> errors.InvalidArgument:
    """The client stopped sending: the upload is abandoned (the image back in QUEUED)."""
    return errors.InvalidArgument(
        f"the upload sent nothing for {timeout:g} s: abandoned", reason=BAD_STREAM,
        violations=[errors.FieldViolation("chunk", "the stream went idle")])


@dataclass(frozen=True)
class Transfer:
    """What uploads and downloads need besides the store: the bytes and the limits."""

    bytes_store: image_store.ImageStore
    settings: StorageSettings


def _reject(message: str, reason: str, field: str, **metadata: str) -> _Rejected:
    return _Rejected(message, reason=reason, metadata=metadata,
                     violations=[errors.FieldViolation(field, message)])


def _check_header(header: image_pb2.ImageUploadHeader, limit: int) -> str:
    """The expected checksum (lower-case hex, or "") once the header is well formed."""
    found = errors.ViolationCollector()
    if not resources.is_uuid(header.image_id):
        found.add("header.image_id", "must be a UUID")
    if not 0 <= header.size_bytes <= limit:
        found.add("header.size_bytes", f"0 (unknown) up to the cap of {limit} bytes")
    checksum = header.checksum_sha256.lower()
    if checksum and not _SHA256.fullmatch(checksum):
        found.add("header.checksum_sha256", "64 hex digits, or empty")
    found.check("invalid upload header")
    return checksum


async def _first(stream: AsyncIterator[image_pb2.UploadImageRequest],
                 idle: float) -> image_pb2.ImageUploadHeader:
    try:
        async with asyncio.timeout(idle):
            first = await anext(stream)
    except StopAsyncIteration:
        first = image_pb2.UploadImageRequest()
    except TimeoutError:
        raise _idle(idle) from None
    if first.WhichOneof("part") != "header":
        raise errors.InvalidArgument(
            "the first message of an upload is its header",
            reason=BAD_STREAM, violations=[errors.FieldViolation("header", "must come first")])
    return first.header


async def upload(store: Store, transfer: Transfer, caller: Principal | None,
                 stream: AsyncIterator[image_pb2.UploadImageRequest]) -> image_pb2.Image:
    """Take one upload stream to an ACTIVE image, or fail leaving no bytes (module doc)."""
    limits = transfer.settings
    header = await _first(stream, limits.upload_idle_timeout)
    checksum = _check_header(header, limits.max_image_bytes)
    target = await image.get(store, caller, header.image_id, "header.image_id")
    image.require_owner(caller, target)
    lease = await store.grant_lease(limits.upload_lease_ttl)
    keeper = store.keep_alive(lease)
    upload_id = resources.new_id()
    try:
        await _begin(store, target.meta.id, upload_id, lease)
        return await _transfer(store, transfer, target.meta.id, upload_id, header, checksum,
                               stream)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await _shielded(_revoke(store, lease))


async def _revoke(store: Store, lease: Lease) -> None:
    with contextlib.suppress(errors.NubisError):
        await store.revoke_lease(lease)


async def _begin(store: Store, image_id: str, upload_id: str, lease: Lease) -> None:
    """QUEUED/ERROR (or SAVING of a dead upload) -> SAVING, with our upload record."""
    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        if current is None:
            raise errors.NotFound(f"image {image_id} not found", metadata={"image_id": image_id})
        record = current.value
        held = await txn.get(keys.image_upload(image_id), image_pb2.ImageUpload)
        if held is not None:
            raise errors.FailedPrecondition(
                f"image {image_id} is being uploaded already", reason=UPLOAD_IN_PROGRESS,
                metadata={"image_id": image_id})
        if record.state not in (State.QUEUED, State.ERROR, State.SAVING):
            raise errors.FailedPrecondition(
                f"image {image_id} is {State.Name(record.state)}: only a QUEUED (or failed) "
                "image takes an upload, and an image's bytes never change",
                reason=NOT_UPLOADABLE, metadata={"image_id": image_id,
                                                 "state": State.Name(record.state)})
        record.state = State.SAVING
        record.ClearField("fault")
        record.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.image(image_id), record)
        txn.put(keys.image_upload(image_id), image_pb2.ImageUpload(
            image_id=image_id, upload_id=upload_id, start_time=resources.now()), lease=lease)

    await store.atomic(body)


async def _transfer(store: Store, transfer: Transfer, image_id: str, upload_id: str,
                    header: image_pb2.ImageUploadHeader, checksum: str,
                    stream: AsyncIterator[image_pb2.UploadImageRequest]) -> image_pb2.Image:
    limits, bytes_store = transfer.settings, transfer.bytes_store
    staged: image_store.Staged | None = None
    try:
        # Leftovers of uploads whose replica died; we hold the image's upload now.
        await bytes_store.discard_staging(image_id)
        chunks = _chunks(stream, header.size_bytes, limits)
        staged = await bytes_store.write(image_id, upload_id, chunks)
        record = await image.fetch(store, image_id)
        facts = await _verify(staged, header, checksum, record.disk_format, limits)
        await bytes_store.commit(staged)
        return await _activate(store, bytes_store, record, upload_id, staged, facts)
    except _Rejected as exc:
        await _fail(store, transfer, image_id, upload_id, staged, exc)
        raise
    except BaseException:
        await _fail(store, transfer, image_id, upload_id, staged, None)
        raise


async def _chunks(stream: AsyncIterator[image_pb2.UploadImageRequest | Chunk],
                  declared: int, limits: StorageSettings) -> AsyncIterator[bytes | memoryview]:
    """The chunks of the stream, each checked before a byte of it is written.

    Over gRPC a chunk is a view of the message received (below: the wire): no copy.
    """
    total = 0
    while True:
        try:
            async with asyncio.timeout(limits.upload_idle_timeout):
                message = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _idle(limits.upload_idle_timeout) from None
        if message.WhichOneof("part") != "chunk":
            raise _reject("after the header every message is a chunk", BAD_STREAM, "chunk")
        chunk = message.chunk
        if len(chunk) > MAX_CHUNK:
            raise _reject(f"a chunk is at most {MAX_CHUNK} bytes, not {len(chunk)}",
                          BAD_STREAM, "chunk")
        total += len(chunk)
        if declared and total > declared:
            raise _reject(f"the stream passed the declared {declared} bytes",
                          SIZE_MISMATCH, "header.size_bytes", declared=str(declared))
        if total > limits.max_image_bytes:
            raise _reject(f"the image passed the cap of {limits.max_image_bytes} bytes",
                          TOO_LARGE, "chunk", limit=str(limits.max_image_bytes))
        if chunk:
            yield chunk


@dataclass(frozen=True)
class _Facts:
    """What verification learned about the bytes."""

    virtual_size: int


async def _verify(staged: image_store.Staged, header: image_pb2.ImageUploadHeader,
                  checksum: str, disk_format: int, limits: StorageSettings) -> _Facts:
    if staged.size == 0:
        raise _reject("the upload carried no bytes", EMPTY, "chunk")
    if header.size_bytes and staged.size != header.size_bytes:
        raise _reject(f"the stream carried {staged.size} bytes, not the declared "
                      f"{header.size_bytes}", SIZE_MISMATCH, "header.size_bytes",
                      declared=str(header.size_bytes), received=str(staged.size))
    if checksum and staged.sha256 != checksum:
        raise _reject("the bytes' SHA-256 is not the declared checksum", CHECKSUM_MISMATCH,
                      "header.checksum_sha256", declared=checksum, received=staged.sha256)
    info = await _qemu_img_info(staged, limits)
    probed, wanted = str(info.get("format", "")), _PROBED.get(disk_format, "")
    if probed != wanted:
        shown = filtering.enum_name(Format.DESCRIPTOR, disk_format)
        raise _reject(f"the image is declared {shown} but its bytes are {probed or 'unreadable'}",
                      FORMAT_MISMATCH, "header.image_id", declared=shown, found=probed)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise _reject("a qcow2 image with a backing file is refused (it would read another "
                      "file)", UNSAFE, "header.image_id")
    data = info.get("format-specific", {}).get("data", {})
    if isinstance(data, dict) and data.get("data-file"):
        raise _reject("a qcow2 image with an external data file is refused", UNSAFE,
                      "header.image_id")
    return _Facts(int(info.get("virtual-size", staged.size)))


async def _qemu_img_info(staged: image_store.Staged, limits: StorageSettings) -> dict[str, Any]:
    """`qemu-img info --output=json` of the staged file, without following backing files."""
    try:
        process = await asyncio.create_subprocess_exec(
            limits.qemu_img, "info", "--output=json", str(staged.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise errors.FailedPrecondition(
            f"cannot run {limits.qemu_img}: {exc.strerror}", reason="nubis.image.no_inspector",
            metadata={"qemu_img": limits.qemu_img}) from None
    try:
        async with asyncio.timeout(limits.inspect_timeout):
            out, err = await process.communicate()
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await _shielded(process.wait())
        if isinstance(exc, TimeoutError):
            raise errors.Unavailable(
                f"qemu-img took over {limits.inspect_timeout:g} s to inspect the image",
                reason="nubis.image.inspect_timeout") from None
        raise
    if process.returncode != 0:
        raise _reject(f"qemu-img cannot read the image: {err.decode(errors='replace')[:200]}",
                      FORMAT_MISMATCH, "header.image_id")
    parsed = json.loads(out)
    return parsed if isinstance(parsed, dict) else {}


async def _activate(store: Store, bytes_store: image_store.ImageStore,
                    record: image_pb2.Image, upload_id: str, staged: image_store.Staged,
                    facts: _Facts) -> image_pb2.Image:
    """SAVING -> ACTIVE with size and checksum, if this upload still holds the image."""
    image_id = record.meta.id

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        held = await txn.get(keys.image_upload(image_id), image_pb2.ImageUpload)
        if current is None or current.value.state != State.SAVING or held is None \
                or held.value.upload_id != upload_id:
            raise errors.FailedPrecondition(
                f"image {image_id} was deleted or taken over during the upload",
                reason="nubis.image.upload_lost", metadata={"image_id": image_id})
        done = current.value
        done.state = State.ACTIVE
        done.size_bytes = staged.size
        done.virtual_size_bytes = facts.virtual_size
        done.checksum_sha256 = staged.sha256
        done.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.image(image_id), done)
        txn.delete(keys.image_upload(image_id))

    try:
        await store.atomic(body)
    except errors.FailedPrecondition:
        # Deleted meanwhile (its delete may have removed the bytes before our rename):
        # the bytes go. A DELETED mark is never restored for an image without bytes.
        found = await store.find(keys.image(image_id), image_pb2.Image)
        if found is None or found.value.state == State.DELETED:
            await bytes_store.delete(image_id)
        raise
    return await image.fetch(store, image_id)


async def _fail(store: Store, transfer: Transfer, image_id: str, upload_id: str,
                staged: image_store.Staged | None, rejected: _Rejected | None) -> None:
    """No bytes kept; the image to ERROR (data refused) or back to QUEUED (anything else)."""
    async def cleanup() -> None:
        if staged is not None:
            await transfer.bytes_store.discard(staged)
        await transfer.bytes_store.discard_staging(image_id)
        await _settle(store, image_id, upload_id, rejected)

    await _shielded(cleanup())


async def _settle(store: Store, image_id: str, upload_id: str,
                  rejected: _Rejected | None) -> None:
    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        held = await txn.get(keys.image_upload(image_id), image_pb2.ImageUpload)
        if current is None or held is None or held.value.upload_id != upload_id:
            return  # deleted, or another upload took over: nothing of ours to settle
        failed = current.value
        if failed.state == State.SAVING:
            failed.state = State.QUEUED if rejected is None else State.ERROR
            if rejected is not None:
                failed.fault.CopyFrom(resource_pb2.Fault(
                    reason=rejected.reason, message=rejected.message[:500], time=resources.now()))
            failed.meta.update_time.CopyFrom(resources.now())
            txn.put(keys.image(image_id), failed)
        txn.delete(keys.image_upload(image_id))

    try:
        await store.atomic(body)
    except errors.NubisError as exc:
        # The image stays SAVING; recover_uploads puts it back once our lease is gone.
        log.warning("failed upload not settled", image_id=image_id, error=exc.message)


async def _shielded(work: Any) -> None:
    """Run cleanup to its end even when the upload's task is being cancelled."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def recover_uploads(store: Store) -> int:
    """SAVING images whose upload record is gone (the replica died) back to QUEUED."""
    items, _ = await store.list_all(keys.IMAGES, image_pb2.Image)
    recovered = 0
    for item in items:
        if item.value.state != State.SAVING:
            continue
        image_id = item.value.meta.id

        async def body(txn: Txn, image_id: str = image_id) -> bool:
            current = await txn.get(keys.image(image_id), image_pb2.Image)
            held = await txn.get(keys.image_upload(image_id), image_pb2.ImageUpload)
            if current is None or current.value.state != State.SAVING or held is not None:
                return False
            queued = current.value
            queued.state = State.QUEUED
            queued.meta.update_time.CopyFrom(resources.now())
            txn.put(keys.image(image_id), queued)
            return True

        if await store.atomic(body):
            log.info("upload of a replica that is gone: image back in QUEUED", image_id=image_id)
            recovered += 1
    return recovered


async def download(store: Store, transfer: Transfer, caller: Principal | None,
                   request: image_pb2.DownloadImageRequest
                   ) -> AsyncIterator[image_pb2.DownloadImageResponse | bytes]:
    """The record, then the bytes from `offset` in chunks (encoded: the wire, below)."""
    record = await image.get(store, caller, request.id)
    if record.state != State.ACTIVE:
        raise errors.FailedPrecondition(
            f"image {record.meta.id} is {State.Name(record.state)}: only ACTIVE images have bytes",
            reason=image.NOT_ACTIVE, metadata={"image_id": record.meta.id})
    if not 0 <= request.offset <= record.size_bytes:
        raise errors.InvalidArgument(
            f"offset must be 0..{record.size_bytes}",
            violations=[errors.FieldViolation("offset", f"0..{record.size_bytes}")])
    chunks = transfer.bytes_store.read(record.meta.id, request.offset,
                                       transfer.settings.download_chunk_bytes)
    return _responses(record, chunks)


async def _responses(record: image_pb2.Image, chunks: AsyncIterator[bytes]
                     ) -> AsyncIterator[image_pb2.DownloadImageResponse | bytes]:
    """The record, then each chunk encoded as its DownloadImageResponse (below: the wire)."""
    yield image_pb2.DownloadImageResponse(image=record)
    try:
        async for chunk in chunks:
            yield encode_chunk(chunk)
    except FileNotFoundError:
        raise errors.Unavailable(
            f"the bytes of image {record.meta.id} are not in this replica's image directory "
            "(replicas must share it)", reason="nubis.image.bytes_missing",
            metadata={"image_id": record.meta.id}) from None


async def keep_recovering(store: Store, transfer: Transfer, interval: float = 30.0) -> None:
    """Forever: give back images of uploads and deletes whose replica died (run supervised)."""
    while True:
        await recover_uploads(store)
        await image.recover_deletes(store, transfer.bytes_store)
        await asyncio.sleep(interval)


# --- the wire ---
# Image bytes on the wire without protobuf copies (services.common.image_wire):
# an UploadImageRequest that is exactly one `chunk` field becomes a `Chunk`
# whose bytes are a view of what gRPC received; every other message (the
# header, anything unusual) is parsed by protobuf as before. A DownloadImage
# chunk is encoded straight from the bytes read, the same wire bytes protobuf
# would write. The stream's messages are unchanged for clients.

UPLOAD = "UploadImage"
DOWNLOAD = "DownloadImage"
STREAM_WINDOW_BYTES = 4 << 20
"""Bytes an upload stream may have received and not yet read: a fixed HTTP/2 window."""
SERVER_OPTIONS = (("grpc.http2.bdp_probe", 0),
                  ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES))
"""The storage server's stream window. grpc's adaptive window grows with the round trip
of its pings, which a loaded machine stretches: uploads then held up to ~80 MiB more
received bytes (measured with bench/image_bench.py), about 8 MiB with this window."""
Chunk = image_wire.ChunkView
"""An UploadImageRequest whose part is `chunk`, the bytes a view of the received message."""
encode_chunk = image_wire.encode_chunk


def parse_upload(data: bytes) -> image_pb2.UploadImageRequest | Chunk:
    """One UploadImage message: a `Chunk` view when it is only a chunk, else parsed by protobuf."""
    view = image_wire.chunk_view(data)
    if view is not None:
        return view
    return image_pb2.UploadImageRequest.FromString(data)


def serialize_download(message: image_pb2.DownloadImageResponse | bytes) -> bytes:
    """A DownloadImage response: bytes already encoded by `encode_chunk`, or a message."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


class _Lean:
    """Stands in for the grpc server while the generated code adds StorageService to it."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_LeanGeneric(each) for each in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, {
            name: lean(handler) for name, handler in handlers.items()})


def lean(handler: Any) -> Any:
    """`handler` with the image codecs if it is UploadImage's or DownloadImage's."""
    if handler is None:
        return None
    method = getattr(handler.stream_unary or handler.unary_stream, "__name__", "")
    if method == UPLOAD and handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            handler.stream_unary, parse_upload, handler.response_serializer)
    if method == DOWNLOAD and handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            handler.unary_stream, handler.request_deserializer, serialize_download)
    return handler


class _LeanGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return lean(self._inner.service(handler_call_details))


def add_to_server(servicer: Any, server: Any) -> None:
    """Add StorageService as the generated code does, with the image codecs on its streams."""
    lean_server: Any = _Lean(server)
    storage_service_pb2_grpc.add_StorageServiceServicer_to_server(servicer, lean_server)
