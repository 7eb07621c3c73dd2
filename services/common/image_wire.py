"""Image chunks on the wire without protobuf copies, for both ends of UploadImage/DownloadImage.

A 1 MiB chunk parsed by protobuf is copied twice (into the message, then out
of it as `bytes`), and one sent is copied twice more (into a message, then
into its serialization). Both UploadImageRequest and DownloadImageResponse
carry their bytes as field 2 (`chunk`) of their oneof, so a message that is
exactly one chunk is the tag, the length as a varint, then the bytes: these
functions write that straight from the bytes (`encode_chunk`) and read it as
a view of the bytes gRPC received (`chunk_view`). Every other message (an
upload's header, a download's record, anything unusual) goes through protobuf
as before; the wire is what protobuf writes, so neither end needs the other
to use these.
"""

from __future__ import annotations

import os

CHUNK_BYTES = 1 << 20
"""Most bytes in one chunk message (the API's limit)."""
CHUNK_TAG = 0x12
"""Field 2 (`chunk` of both oneofs), length-delimited."""
HEAD_ROOM = 4
"""Bytes before a chunk that its tag and length take at most (a length < 2**21)."""


class ChunkView:
    """A chunk message as a view of the bytes received; reads like the protobuf message.

    `WhichOneof("part")` is "chunk" and `HasField` is true for "chunk" only, so
    code written for the protobuf message reads it unchanged; `chunk` is a
    memoryview (hashlib, file writes and `len` take it without a copy).
    """

    __slots__ = ("chunk",)

    def __init__(self, chunk: memoryview) -> None:
        self.chunk = chunk

    def WhichOneof(self, group: str) -> str:
        return "chunk"

    def HasField(self, name: str) -> bool:
        return name == "chunk"


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` and the index after it; (-1, at) if it is not a short, whole one."""
    value = shift = 0
    for index in range(at, min(at + 5, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return -1, at


def chunk_view(data: bytes) -> ChunkView | None:
    """The message `data` as a view of its chunk if it is exactly one chunk field, else None."""
    if data[:1] == bytes((CHUNK_TAG,)):
        length, start = _varint(data, 1)
        if length >= 0 and start + length == len(data):
            return ChunkView(memoryview(data)[start:])
    return None


def chunk_head(size: int) -> bytes:
    """The tag and length that precede a chunk of `size` bytes."""
    head = bytearray((CHUNK_TAG,))
    while True:
        if size < 0x80:
            head.append(size)
            return bytes(head)
        head.append((size & 0x7F) | 0x80)
        size >>= 7


def encode_chunk(chunk: bytes | bytearray | memoryview) -> bytes:
    """The wire bytes of a message holding only `chunk` (either message: the same bytes)."""
    return chunk_head(len(chunk)) + chunk


class ChunkReader:
    """A file's bytes as encoded chunk messages, read into one buffer reused for each.

    Each chunk is read into the buffer after room for its head, and the message
    is the one copy of head and bytes gRPC needs as `bytes`: no other buffer is
    allocated per chunk.
    """

    def __init__(self, fd: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._fd = fd
        self._buffer = bytearray(HEAD_ROOM + chunk_bytes)
        self._view = memoryview(self._buffer)

    def next_message(self) -> tuple[bytes, int]:
        """The next chunk message and how many bytes of the file it holds (0: the end)."""
        size = _read_into(self._fd, self._view[HEAD_ROOM:])
        if not size:
            return b"", 0
        head = chunk_head(size)
        start = HEAD_ROOM - len(head)
        self._view[start:HEAD_ROOM] = head
        return bytes(self._view[start:HEAD_ROOM + size]), size


def _read_into(fd: int, into: memoryview) -> int:
    """Fill `into` from `fd` (short only at the end of the file); the bytes read."""
    filled = 0
    while filled < len(into):
        got = os.readv(fd, [into[filled:]])
        if not got:
            break
        filled += got
    return filled


__all__ = ["CHUNK_BYTES", "ChunkReader", "ChunkView", "chunk_head", "chunk_view",
           "encode_chunk"]
