"""The image codecs write and read exactly the wire bytes protobuf does."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from nubis.storage.v1 import image_pb2

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
