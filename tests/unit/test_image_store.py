"""The directory image store keeps exactly the bytes streamed in, whatever their chunking,
written and read past the page cache (O_DIRECT) when it syncs, through it when not."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.storage import image_store

MIB = 1 << 20
BLOCK = image_store.DIRECT_BLOCK


async def _stream(data: bytes, sizes: list[int]) -> AsyncIterator[memoryview]:
    view, at, index = memoryview(data), 0, 0
    while at < len(data):
        size = sizes[index % len(sizes)]
        yield view[at:at + size]
        at, index = at + size, index + 1


async def _read_all(store: image_store.DirectoryImageStore, image_id: str, offset: int,
                    chunk: int) -> bytes:
    return b"".join([part async for part in store.read(image_id, offset, chunk)])


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize(("length", "sizes"), [
    (1, [1]),
    (4095, [MIB]),
    (2 * BLOCK, [MIB]),  # whole blocks only: no tail
    (2 * BLOCK + 4097, [MIB, 1000, 3]),  # chunks across blocks, an unaligned tail
    (3 * MIB + 5, [MIB - 1]),
])
async def test_the_bytes_read_back_are_the_bytes_written(
        tmp_path: Path, sync: bool, length: int, sizes: list[int]) -> None:
    store = image_store.directory_store(tmp_path, sync=sync)
    try:
        data = os.urandom(length)
        staged = await store.write("img-1", "up-1", _stream(data, sizes))
        assert (staged.size, staged.sha256) == (length, hashlib.sha256(data).hexdigest())
        assert staged.path.read_bytes() == data
        await store.commit(staged)
        assert await _read_all(store, "img-1", 0, MIB) == data
        for offset in (1, 4095, 4096, length // 2, length):  # unaligned chunks too
            assert await _read_all(store, "img-1", offset, 16 * 4096 + 1) == data[offset:]
        assert store.staged_files("img-1") == []
    finally:
        store.close()


async def test_a_stream_that_fails_midway_leaves_no_file(tmp_path: Path) -> None:
    store = image_store.directory_store(tmp_path, sync=True)

    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(BLOCK + 10)  # one block goes to the disk before the failure
        raise ConnectionError("cut")

    try:
        with pytest.raises(ConnectionError):
            await store.write("img-2", "up-2", broken())
        assert store.staged_files("img-2") == []
        assert not store.path("img-2").exists()
    finally:
        store.close()
