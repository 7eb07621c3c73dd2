"""The image codecs write and read exactly the wire bytes protobuf does, at both ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from nubis.storage.v1 import image_pb2

from services.client import image_stream
from services.common import image_wire
from services.storage import image_upload

SIZES = [0, 1, 127, 128, 16383, 16384, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_a_download_chunk_is_encoded_as_protobuf_does(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    encoded = image_upload.encode_chunk(data)
    assert encoded == image_pb2.DownloadImageResponse(chunk=data).SerializeToString()
    assert image_pb2.DownloadImageResponse.FromString(encoded).chunk == data


@pytest.mark.parametrize("size", [size for size in SIZES if size])
def test_an_upload_chunk_is_a_view_of_the_message(size: int) -> None:
    data = b"\x12" * size
    parsed = image_upload.parse_upload(image_pb2.UploadImageRequest(chunk=data).SerializeToString())
    assert isinstance(parsed, image_upload.Chunk)
    assert parsed.WhichOneof("part") == "chunk" and bytes(parsed.chunk) == data


def test_every_other_upload_message_is_parsed_by_protobuf() -> None:
    header = image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(size_bytes=5))
    parsed = image_upload.parse_upload(header.SerializeToString())
    assert isinstance(parsed, image_pb2.UploadImageRequest) and parsed.header.size_bytes == 5
    # A chunk followed by another field, and an empty message, are protobuf's to parse.
    chunk = image_pb2.UploadImageRequest(chunk=b"abc").SerializeToString()
    mixed = chunk + header.SerializeToString()
    assert isinstance(image_upload.parse_upload(mixed), image_pb2.UploadImageRequest)
    assert image_upload.parse_upload(b"").WhichOneof("part") is None
    with pytest.raises(DecodeError):  # a chunk cut short: protobuf refuses it
        image_upload.parse_upload(b"\x12\x05abc")


# --- the client's end (services.client.image_stream) ---


@pytest.mark.parametrize("size", [size for size in SIZES if size])
def test_a_download_chunk_is_a_view_for_the_client(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    parsed = image_stream.parse_download(image_upload.encode_chunk(data))
    assert isinstance(parsed, image_wire.ChunkView)
    assert isinstance(parsed.chunk, memoryview) and bytes(parsed.chunk) == data
    assert parsed.WhichOneof("part") == "chunk" and parsed.HasField("chunk")
    assert not parsed.HasField("image")


def test_a_download_record_is_parsed_by_protobuf_for_the_client() -> None:
    record = image_pb2.DownloadImageResponse(image=image_pb2.Image(size_bytes=7))
    parsed = image_stream.parse_download(record.SerializeToString())
    assert isinstance(parsed, image_pb2.DownloadImageResponse)
    assert parsed.HasField("image") and parsed.image.size_bytes == 7


@pytest.mark.parametrize("size", [1, 127, 128, 16384, (1 << 20) - 1, 1 << 20,
                                  (1 << 20) + 1, 3 * (1 << 20) + 5])
def test_a_file_is_read_as_the_upload_chunks_protobuf_writes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = image_wire.ChunkReader(fd)
        messages = []
        while (read := reader.next_message())[1]:
            messages.append(read)
    finally:
        os.close(fd)
    expected = [data[at:at + image_wire.CHUNK_BYTES]
                for at in range(0, size, image_wire.CHUNK_BYTES)]
    assert [message for message, _ in messages] == [
        image_pb2.UploadImageRequest(chunk=chunk).SerializeToString() for chunk in expected]
    assert [held for _, held in messages] == [len(chunk) for chunk in expected]
    # The service reads each as a view of exactly those bytes.
    views = [image_upload.parse_upload(message) for message, _ in messages]
    assert all(isinstance(view, image_upload.Chunk) for view in views)
    assert b"".join(bytes(view.chunk) for view in views) == data
