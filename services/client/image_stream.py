"""UploadImage and DownloadImage for clients, their chunks never copied through protobuf.

`storage_stub` is the generated StorageService stub with the chunk codecs of
``services.common.image_wire`` on its two streams: an upload sends chunks
already encoded (`upload_messages` reads each from the file into one reused
buffer), and a download's chunks arrive as `ChunkView`s, views of the bytes
gRPC received, which `write_chunks` hashes and writes without copying. The
header, the record and every other message are protobuf as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.common import image_wire

if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    Stub = storage_service_pb2_grpc.StorageServiceAsyncStub

SERVICE = "/nubis.storage.v1.StorageService"
UPLOAD = f"{SERVICE}/UploadImage"
DOWNLOAD = f"{SERVICE}/DownloadImage"


def serialize_upload(message: image_pb2.UploadImageRequest | bytes) -> bytes:
    """An UploadImage message: a chunk already encoded (`bytes`), or a protobuf message."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def parse_download(data: bytes) -> image_pb2.DownloadImageResponse:
    """A DownloadImage message: a `ChunkView` when it is only a chunk, else parsed by protobuf.

    Typed as the protobuf message it stands in for: a chunk's readers use only
    `WhichOneof`, `HasField` and `chunk` (then a memoryview).
    """
    view = image_wire.chunk_view(data)
    if view is not None:
        return view  # type: ignore[return-value]
    return image_pb2.DownloadImageResponse.FromString(data)


def storage_stub(channel: grpc.aio.Channel) -> Stub:
    """The StorageService stub of `channel`, with the chunk codecs on its image streams."""
    stub: Any = storage_service_pb2_grpc.StorageServiceStub(channel)
    stub.UploadImage = channel.stream_unary(
        UPLOAD, request_serializer=serialize_upload,
        response_deserializer=image_pb2.Image.FromString)
    stub.DownloadImage = channel.unary_stream(
        DOWNLOAD, request_serializer=image_pb2.DownloadImageRequest.SerializeToString,
        response_deserializer=parse_download)
    return stub  # type: ignore[no-any-return]


async def upload_messages(header: image_pb2.ImageUploadHeader, path: Path,
                          advance: Callable[[int], None] = lambda _: None,
                          ) -> AsyncIterator[image_pb2.UploadImageRequest]:
    """The UploadImage stream: the header, then the file in encoded 1 MiB chunks.

    Typed as the protobuf messages the chunks stand in for (`serialize_upload`
    sends them as they are).
    """
    yield image_pb2.UploadImageRequest(header=header)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = image_wire.ChunkReader(fd)
        while True:
            message, size = reader.next_message()
            if not size:
                return
            advance(size)
            yield message  # type: ignore[misc]
    finally:
        os.close(fd)


async def write_chunks(parts: AsyncIterable[Any], fd: int,
                       advance: Callable[[int], None] = lambda _: None) -> tuple[int, str]:
    """Write every chunk of a download's messages to `fd`; the bytes written and their sha256.

    Each chunk is hashed and written where it arrived, in the event loop's
    thread: both release the GIL, and handing them to threads cost more per
    MiB than it saved (measured with bench/image_bench.py).
    """
    digest = hashlib.sha256()
    size = 0
    async for part in parts:
        chunk = part.chunk
        digest.update(chunk)
        _write_all(fd, chunk)
        size += len(chunk)
        advance(len(chunk))
    return size, digest.hexdigest()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


__all__ = ["parse_download", "serialize_upload", "storage_stub", "upload_messages",
           "write_chunks"]
