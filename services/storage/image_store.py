"""Where image bytes live: a small store interface and its first backend, a directory.

An upload is written to a staging file (`write`, hashing as it goes), checked
by the caller, then either committed under the image id in one atomic step
(`commit`: fsync, rename, fsync of the directory) or thrown away (`discard`).
A reader opens a committed image at an offset and gets it in chunks (`read`);
`delete` removes an image's bytes and any staging file of it. Nothing here
knows about etcd or image states: ``services.storage.image`` decides, this
module only moves bytes, never holding more than two chunks (and, syncing,
two 4 MiB write blocks) in memory.

When it syncs (the bytes must reach the disk before an image is committed),
the backend writes and reads image files with O_DIRECT, past the page cache:
an upload's bytes are copied into aligned blocks written while the next one
fills, never into the page cache to be written back later, and a download
reads them from the disk into one aligned buffer. On this kind of write most
of the CPU an upload cost was the kernel copying into fresh page-cache pages.
A filesystem without O_DIRECT (tmpfs) gets the buffered path, as does a store
that does not sync.

The directory backend keeps ``<dir>/<image id>`` per committed image and
``<dir>/staging/<image id>.<upload id>.part`` per upload in progress. Several
storage replicas must share the directory (one filesystem mounted at the same
path on each): any replica may serve the download of an image another stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

T = TypeVar("T")

STAGING = "staging"
_PART = ".part"
# Bytes of an upload written between two write-backs of its staging file.
FLUSH_BYTES = 32 << 20


@dataclass(frozen=True)
class Staged:
    """The bytes of one upload, written and hashed, waiting to be committed or discarded."""

    image_id: str
    upload_id: str
    path: Path
    """A local file holding the bytes (what `qemu-img info` inspects)."""
    size: int
    sha256: str
    """Hex SHA-256 of the bytes."""


class ImageStore(Protocol):
    """The bytes of images, by image id."""

    async def write(self, image_id: str, upload_id: str,
                    chunks: AsyncIterable[bytes | memoryview]) -> Staged:
        """Stream `chunks` into a new staging file; on any failure nothing is left."""
        ...

    async def commit(self, staged: Staged) -> None:
        """Make the staged bytes the image's, atomically and durably (replacing older ones)."""
        ...

    async def discard(self, staged: Staged) -> None:
        """Throw the staged bytes away."""
        ...

    async def discard_staging(self, image_id: str) -> None:
        """Remove every staging file of `image_id` (uploads that died with their replica)."""
        ...

    def read(self, image_id: str, offset: int, chunk_size: int) -> AsyncIterator[bytes]:
        """The committed bytes of `image_id` from `offset`, `chunk_size` at a time."""
        ...

    async def delete(self, image_id: str) -> None:
        """Remove the image's bytes and staging files; absent ones are fine."""
        ...

    async def exists(self, image_id: str) -> bool:
        """Whether committed bytes of `image_id` are there."""
        ...


class DirectoryImageStore:
    """`ImageStore` over a local (or shared) directory."""

    def __init__(self, root: str | Path, *, threads: int = 8, sync: bool = True) -> None:
        self.root = Path(root)
        self.staging = self.root / STAGING
        # Bytes reach the disk before an image is committed (fsync); off: the page cache.
        self.sync = sync
        # File work runs here, beside the event loop: a few uploads and downloads at once.
        self._threads = futures.ThreadPoolExecutor(threads, thread_name_prefix="image-store")

    def ensure(self) -> None:
        """Create the directory and its staging directory if missing."""
        self.staging.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def path(self, image_id: str) -> Path:
        return self.root / _plain(image_id)

    def staging_path(self, image_id: str, upload_id: str) -> Path:
        return self.staging / f"{_plain(image_id)}.{_plain(upload_id)}{_PART}"

    def staged_files(self, image_id: str) -> list[Path]:
        """Staging files of `image_id` now (a failed upload leaves none)."""
        return sorted(self.staging.glob(f"{_plain(image_id)}.*{_PART}"))

    async def write(self, image_id: str, upload_id: str,
                    chunks: AsyncIterable[bytes | memoryview]) -> Staged:
        path = self.staging_path(image_id, upload_id)
        fd = await self._run(_open_direct, path) if self.sync else None
        if fd is None:
            return await self._write_buffered(image_id, upload_id, path, chunks)
        return await self._write_direct(image_id, upload_id, path, fd, chunks)

    async def _write_direct(self, image_id: str, upload_id: str, path: Path, fd: int,
                            chunks: AsyncIterable[bytes | memoryview]) -> Staged:
        """Bytes that must reach the disk anyway, written past the page cache (O_DIRECT).

        Nothing is copied into the page cache nor written back later: each chunk
        is hashed in one thread and copied into the aligned block being filled,
        and a full block is written in another thread while the next one fills.
        """
        hasher = hashlib.sha256()
        size = 0
        blocks = _Blocks()
        hashing: futures.Future[None] | None = None
        writing: futures.Future[None] | None = None
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                if hashing is not None:
                    await asyncio.wrap_future(hashing)
                size += len(view)
                hashing = self._threads.submit(hasher.update, view)
                at = 0
                while at < len(view):
                    at = blocks.add(view, at)
                    if blocks.full:
                        if writing is not None:  # the block filled next is written out
                            await asyncio.wrap_future(writing)
                        writing = self._threads.submit(_write_all, fd, blocks.swap())
            for work in (hashing, writing):
                if work is not None:
                    await asyncio.wrap_future(work)
            await self._run(_finish_direct, fd, blocks, size)
        except BaseException:
            await self._shielded(_remove_direct, [hashing, writing], path, fd, blocks)
            raise
        await self._run(_close_direct, fd, blocks)
        return Staged(image_id, upload_id, path, size, hasher.hexdigest())

    async def _write_buffered(self, image_id: str, upload_id: str, path: Path,
                              chunks: AsyncIterable[bytes | memoryview]) -> Staged:
        """Bytes written through the page cache (written back as they come when syncing)."""
        hasher = hashlib.sha256()
        size = flushed = 0
        file = await self._run(_open_new, path)
        # The hash and the write of one chunk run in two threads while the next
        # chunk arrives; every FLUSH_BYTES a third thread starts writing the file
        # back to disk, so the fsync at the end finds little left to do.
        pending: list[futures.Future[Any]] = []
        flushing: futures.Future[None] | None = None
        try:
            async for chunk in chunks:
                for work in pending:
                    await asyncio.wrap_future(work)
                size += len(chunk)
                pending = [self._threads.submit(hasher.update, chunk),
                           self._threads.submit(file.write, chunk)]
                if self.sync and size - flushed >= FLUSH_BYTES and (
                        flushing is None or flushing.done()):
                    flushing, flushed = self._threads.submit(_write_back, file), size
            for work in pending:
                await asyncio.wrap_future(work)
            if flushing is not None:
                await asyncio.wrap_future(flushing)
            await self._run(_flush_and_close, file, self.sync)
        except BaseException:
            await self._shielded(_remove_after, [*pending, flushing], path, file)
            raise
        return Staged(image_id, upload_id, path, size, hasher.hexdigest())

    async def commit(self, staged: Staged) -> None:
        await self._run(_replace, staged.path, self.path(staged.image_id), self.sync)

    async def discard(self, staged: Staged) -> None:
        await self._shielded(_remove_after, [], staged.path, None)

    async def discard_staging(self, image_id: str) -> None:
        await self._shielded(self._discard_staging, image_id)

    def _discard_staging(self, image_id: str) -> None:
        for leftover in self.staged_files(image_id):
            _remove_quietly(leftover, None)

    async def read(self, image_id: str, offset: int,
                   chunk_size: int) -> AsyncIterator[bytes]:
        # Written past the page cache (sync), read past it too: no copy into it of
        # bytes read once per node, nor into pages it must first be given.
        opener = _DirectReader.open if self.sync else _open_at
        file = await self._run(opener, self.path(image_id), offset, chunk_size)
        # The next chunk is read in a thread while this one is sent.
        pending = self._threads.submit(file.read, chunk_size)
        try:
            while True:
                chunk = await asyncio.wrap_future(pending)
                if not chunk:
                    return
                pending = self._threads.submit(file.read, chunk_size)
                yield chunk
        finally:
            await self._shielded(_close_after, pending, file)

    async def delete(self, image_id: str) -> None:
        await self._shielded(self._delete, image_id)

    def _delete(self, image_id: str) -> None:
        _remove_quietly(self.path(image_id), None)
        self._discard_staging(image_id)
        _fsync_dir(self.root)

    async def exists(self, image_id: str) -> bool:
        return await self._run(self.path(image_id).is_file)

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._threads.submit(func, *args))

    async def _shielded(self, func: Callable[..., object], *args: Any) -> None:
        """Clean up in a thread even while the calling task is cancelled (a cut stream)."""
        done = asyncio.wrap_future(self._threads.submit(func, *args))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await done  # cancelled while cleaning: finish the cleanup, then stop
            raise


def _plain(segment: str) -> str:
    """Ids become file names: anything but a plain name would escape the directory."""
    if not segment or not all(ch.isalnum() or ch == "-" for ch in segment):
        raise ValueError(f"not a plain id: {segment!r}")
    return segment


def _open_new(path: Path) -> BinaryIO:
    return open(path, "xb")


# Bytes of one direct write: an upload fills two aligned buffers of this size in turn.
DIRECT_BLOCK = 4 << 20
# Alignment of the offset, length and memory of a direct write (a page: every block size).
_ALIGN = 4096


def _open_direct(path: Path) -> int | None:
    """A new file open for O_DIRECT writes; None where the filesystem (or OS) has none."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o666)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None


class _Blocks:
    """Chunks gathered into two page-aligned buffers, filled in turn, for O_DIRECT writes."""

    def __init__(self) -> None:
        # Anonymous mappings are page-aligned, as direct writes need.
        self._buffers = (mmap.mmap(-1, DIRECT_BLOCK), mmap.mmap(-1, DIRECT_BLOCK))
        self._index = 0
        self.fill = 0

    @property
    def full(self) -> bool:
        return self.fill == DIRECT_BLOCK

    def add(self, chunk: memoryview, at: int) -> int:
        """Copy `chunk` from `at` into the buffer being filled, as far as it fits; where it
        stopped."""
        part = chunk[at:at + DIRECT_BLOCK - self.fill]
        self._buffers[self._index][self.fill:self.fill + len(part)] = part
        self.fill += len(part)
        return at + len(part)

    def swap(self) -> mmap.mmap:
        """The full buffer, to be written; filling goes on in the other one."""
        full = self._buffers[self._index]
        self._index ^= 1
        self.fill = 0
        return full

    def tail(self) -> mmap.mmap | _Slice | None:
        """The buffer being filled, zero-padded to the alignment (None if it is empty);
        the bytes written past the image's size are truncated away."""
        if not self.fill:
            return None
        buffer = self._buffers[self._index]
        padded = -(-self.fill // _ALIGN) * _ALIGN
        buffer[self.fill:padded] = bytes(padded - self.fill)
        return buffer if padded == DIRECT_BLOCK else _Slice(buffer, padded)

    def close(self) -> None:
        for buffer in self._buffers:
            buffer.close()


class _Slice:
    """The first `length` bytes of a buffer, as os.write takes them (released after)."""

    def __init__(self, buffer: mmap.mmap, length: int) -> None:
        self.buffer, self.length = buffer, length


def _write_all(fd: int, block: mmap.mmap | _Slice) -> None:
    # In a thread: os.write releases the GIL while the device takes the block.
    buffer, length = (block.buffer, block.length) if isinstance(block, _Slice) \
        else (block, len(block))
    with memoryview(buffer) as whole:
        done = 0
        while done < length:
            done += os.write(fd, whole[done:length])


def _finish_direct(fd: int, blocks: _Blocks, size: int) -> None:
    tail = blocks.tail()
    if tail is not None:
        _write_all(fd, tail)
    os.ftruncate(fd, size)
    os.fsync(fd)


def _close_direct(fd: int, blocks: _Blocks) -> None:
    os.close(fd)
    blocks.close()


def _remove_direct(pending: list[futures.Future[Any] | None], path: Path, fd: int,
                   blocks: _Blocks) -> None:
    # In a thread: the work in flight ends before its file and buffers go.
    for work in pending:
        if work is not None:
            with contextlib.suppress(Exception):
                work.result()
    with contextlib.suppress(OSError):
        os.close(fd)
    blocks.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_back(file: BinaryIO) -> None:
    # Beside the writes: hashlib, file writes and fdatasync release the GIL.
    file.flush()
    os.fdatasync(file.fileno())


def _flush_and_close(file: BinaryIO, sync: bool) -> None:
    file.flush()
    if sync:
        os.fsync(file.fileno())
    file.close()


def _remove_quietly(path: Path, file: BinaryIO | None) -> None:
    if file is not None:
        file.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _remove_after(pending: list[futures.Future[Any] | None], path: Path,
                  file: BinaryIO | None) -> None:
    # In a thread: the work in flight ends before its file is closed and removed.
    for work in pending:
        if work is not None:
            with contextlib.suppress(Exception):
                work.result()
    _remove_quietly(path, file)


def _replace(staged: Path, final: Path, sync: bool) -> None:
    os.replace(staged, final)
    if sync:
        _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_at(path: Path, offset: int, chunk_size: int = 0) -> BinaryIO:
    file = open(path, "rb")  # noqa: SIM115 - closed by the reader, in a thread
    file.seek(offset)
    return file


class _DirectReader:
    """A file read with O_DIRECT from `offset`, a chunk at a time, through one aligned buffer."""

    def __init__(self, fd: int, offset: int, chunk_size: int) -> None:
        self._fd = fd
        self._offset = offset
        # A chunk, plus the part of a block before it when it starts unaligned.
        self._buffer = mmap.mmap(-1, -(-(chunk_size + 2 * _ALIGN) // _ALIGN) * _ALIGN)

    @classmethod
    def open(cls, path: Path, offset: int, chunk_size: int) -> _DirectReader | BinaryIO:
        """A direct reader of `path`, or a plain file where the filesystem has no O_DIRECT."""
        direct = getattr(os, "O_DIRECT", 0)
        try:
            fd = os.open(path, os.O_RDONLY | direct) if direct else -1
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd = -1
        return cls(fd, offset, chunk_size) if fd >= 0 else _open_at(path, offset)

    def read(self, size: int) -> bytes:
        """The next `size` bytes (fewer at the end; b"" after it)."""
        start = self._offset // _ALIGN * _ALIGN
        skip = self._offset - start
        wanted = min(skip + size, len(self._buffer) // _ALIGN * _ALIGN)
        filled, end = 0, False
        with memoryview(self._buffer) as view:
            while filled < wanted and not end:
                got = os.preadv(self._fd, [view[filled:-(-wanted // _ALIGN) * _ALIGN]],
                                start + filled)
                filled += got
                end = got == 0 or got % _ALIGN != 0  # a short read: the file ends there
            data = bytes(view[skip:max(skip, min(filled, wanted))])
        self._offset += len(data)
        return data

    def close(self) -> None:
        os.close(self._fd)
        self._buffer.close()


def _close_after(pending: futures.Future[bytes], file: BinaryIO | _DirectReader) -> None:
    # In a thread: the read in flight ends before its file is closed.
    with contextlib.suppress(Exception):
        pending.result()
    file.close()


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 8 << 20
"""Allocations from this size on are mapped (and unmapped when freed); image chunks are below."""
TRIM_THRESHOLD_BYTES = 16 << 20
"""Free bytes at the top of a heap glibc keeps for the next allocations rather than give back."""
ARENA_MAX = 2


def reuse_chunk_buffers() -> bool:
    """Make glibc reuse the freed 1 MiB buffers of image chunks instead of mapping fresh ones.

    Every mapped buffer is faulted in page by page and zeroed by the kernel,
    then unmapped: with buffers mapped from 256 KiB on, that was most of the
    service's CPU per MiB streamed. Here chunks come from the heap, and the
    memory they hold stays bounded: a fixed mapping threshold (glibc's
    default one grows with the largest buffer freed), at most 16 MiB kept free
    at a heap's top, and two heaps (arenas) whatever the number of threads
    (gRPC's, the file threads'). Called once at process start; False where
    there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return all([libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
                    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                    libc.mallopt(_M_ARENA_MAX, ARENA_MAX)])
    except (OSError, AttributeError):
        return False


def directory_store(root: str | Path, *, sync: bool = True) -> DirectoryImageStore:
    """The directory backend at `root`, created if missing."""
    store = DirectoryImageStore(root, sync=sync)
    store.ensure()
    return store


__all__ = ["DirectoryImageStore", "ImageStore", "Staged", "directory_store", "reuse_chunk_buffers"]
