"""The node's image cache: each image downloaded once from nubis-storage, checked as it streams.

An image is fetched with nubis-storage's server-streaming DownloadImage
(through the service clients, with the node's service credential) into
``<image_cache_path>/image-<id>.part``, hashed while it arrives. Only bytes
of the declared size and sha256 become ``image-<id>``: anything else is
deleted and refused. A download cut midway is resumed at the offset the part
file reached. A qcow2 image naming a backing file of its own is refused (its
guest could read any file of the node).

The complete file then joins the pool as volume ``image-<id>`` (the driver
moves it in; on the test driver the bytes stay here), and a marker
``image-<id>.sha256`` records that the volume holds exactly those bytes. A
volume without its marker is a fetch that did not finish and is made again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.storage.v1 import image_pb2

from services.client import peers
from services.client.peers import stubs
from services.common import errors
from services.common.settings import Settings

log = structlog.get_logger(__name__)

CHECKSUM = "nubis.agent.image_checksum"
"""Reason of a fetched image whose bytes do not match its size or sha256."""
BAD_IMAGE = "nubis.agent.bad_image"
"""Reason of an image whose bytes are not what its format says (or name a backing file)."""

_QCOW2_MAGIC = b"QFI\xfb"
_HASH_BLOCK = 1 << 20


def volume_name(image_id: str) -> str:
    """libvirt volume name of the cached copy of an image."""
    return f"image-{image_id}"


@dataclass(frozen=True)
class DiskHeader:
    """What the first bytes of an image file say about it."""

    format: str
    """"qcow2" if the file has the qcow2 magic, else "raw"."""
    virtual_size: int
    """Bytes a guest sees (the qcow2 header's size; the file size for raw)."""
    has_backing_file: bool


def read_header(path: Path) -> DiskHeader:
    """Parse a qcow2 header (magic, backing file offset, size) or call the file raw."""
    with path.open("rb") as file:
        head = file.read(32)
    if len(head) >= 32 and head[:4] == _QCOW2_MAGIC:
        backing_offset, = struct.unpack(">Q", head[8:16])
        size, = struct.unpack(">Q", head[24:32])
        return DiskHeader("qcow2", int(size), backing_offset != 0)
    return DiskHeader("raw", path.stat().st_size, False)


Sink = Callable[[bytes | memoryview], None]
"""Takes each chunk: a view of the bytes received (services.client.image_stream)."""


class Downloader:
    """Streams images from nubis-storage on one event loop thread shared by every task thread.

    The service clients (and their token and catalog cache) live as long as
    the agent; they are made on first use.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: peers.ServiceClients | None = None

    def warm(self) -> None:
        """Log in to nubis-storage now, in the background, so that the node's first image
        download waits for no login (the agent calls it at start)."""
        asyncio.run_coroutine_threadsafe(self._warm(), self._running_loop())

    async def _warm(self) -> None:
        await self._made_clients().warm(stubs.StorageClient.NAME)

    def _made_clients(self) -> peers.ServiceClients:
        if self._clients is None:  # made on the loop the channels belong to
            self._clients = peers.ServiceClients(
                peers.ClientSettings.from_settings(self._settings))
        return self._clients

    def download(self, image_id: str, offset: int, sink: Sink,
                 timeout: float) -> image_pb2.Image:
        """Send every byte of the image from `offset` to `sink`, within `timeout` seconds;
        the image record the stream began with."""
        loop = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(
            self._download(image_id, offset, sink, seconds=timeout), loop)
        try:
            return future.result(timeout + 5)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise errors.Unavailable(f"download of image {image_id} outlived {timeout:g}s",
                                     reason="nubis.agent.download_timeout") from None
        except BaseException:
            future.cancel()  # the task thread was stopped (a time limit): stop the stream
            raise

    def close(self) -> None:
        with self._lock:
            loop, thread, clients = self._loop, self._thread, self._clients
            self._loop = self._thread = self._clients = None
        if loop is None or thread is None:
            return
        if clients is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(clients.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="image-downloads",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def _download(self, image_id: str, offset: int, sink: Sink, *,
                        seconds: float) -> image_pb2.Image:
        request = image_pb2.DownloadImageRequest(id=image_id, offset=offset)
        record: image_pb2.Image | None = None
        async for part in self._made_clients().storage.DownloadImage(request,
                                                                    deadline=seconds):
            if part.HasField("image"):
                record = part.image
            elif record is None:
                raise errors.FailedPrecondition(
                    f"nubis-storage sent bytes of image {image_id} before its record",
                    reason=BAD_IMAGE)
            else:
                sink(part.chunk)
        if record is None:
            raise errors.FailedPrecondition(f"nubis-storage sent nothing for image {image_id}",
                                            reason=BAD_IMAGE)
        return record


class ImageFiles:
    """The cache directory's files: parts being downloaded, complete images and markers."""

    def __init__(self, directory: Path, downloader: Downloader) -> None:
        self.directory = directory
        self._downloader = downloader

    def file(self, image_id: str) -> Path:
        return self.directory / volume_name(image_id)

    def marked(self, image: tasks_pb2.CachedImageSource) -> bool:
        """True if the pool's image-<id> is known to hold exactly these bytes."""
        return self.marker(image.image_id) == image.sha256

    def marker(self, image_id: str) -> str | None:
        """The sha256 the pool's image-<id> was checked against, None if it never was."""
        try:
            return self._marker(image_id).read_text().strip()
        except FileNotFoundError:
            return None

    def mark(self, image: tasks_pb2.CachedImageSource) -> None:
        marker = self._marker(image.image_id)
        partial = marker.with_suffix(".sha256.part")
        partial.write_text(image.sha256 + "\n")
        os.replace(partial, marker)

    def forget(self, image_id: str) -> None:
        """Drop every file of the image from the cache directory."""
        name = volume_name(image_id)
        for path in (self._marker(image_id), self.directory / name,
                     self.directory / f"{name}.part"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def verified_file(self, image: tasks_pb2.CachedImageSource) -> Path | None:
        """The complete file of the image, if it is here and its bytes still match."""
        path = self.file(image.image_id)
        if not path.is_file() or path.stat().st_size != image.size_bytes:
            return None
        return path if _sha256_of(path) == image.sha256 else None

    def download(self, image: tasks_pb2.CachedImageSource, deadline: float) -> Path:
        """The complete, verified file of the image, downloaded (or resumed) now."""
        self.directory.mkdir(parents=True, exist_ok=True)
        part = self.directory / f"{volume_name(image.image_id)}.part"
        hasher = hashlib.sha256()
        offset = _resume(part, image.size_bytes, hasher)
        started = time.monotonic()
        with part.open("ab") as out:
            written = offset

            def sink(chunk: bytes | memoryview) -> None:
                nonlocal written
                written += len(chunk)
                if written > image.size_bytes:
                    raise errors.InvalidArgument(
                        f"image {image.image_id} streamed more than its {image.size_bytes} "
                        "bytes", reason=CHECKSUM, violations=[errors.FieldViolation(
                            "image.size_bytes", "the stream is longer")])
                hasher.update(chunk)
                out.write(chunk)

            try:
                record = self._downloader.download(image.image_id, offset, sink,
                                                   max(deadline - time.time(), 1.0))
                out.flush()
                os.fsync(out.fileno())
            except (errors.InvalidArgument, errors.NotFound):
                # Bytes that did not verify, or an image storage no longer has: nothing
                # worth resuming. Anything else (a cut stream) keeps the part for a retry.
                part.unlink(missing_ok=True)
                raise
        try:
            _check_record(image, record)
        except errors.InvalidArgument:
            part.unlink(missing_ok=True)
            raise
        self._check_bytes(image, part, written, hasher.hexdigest())
        final = self.file(image.image_id)
        os.replace(part, final)
        log.info("image downloaded", image_id=image.image_id, bytes=written - offset,
                 resumed_at=offset, seconds=round(time.monotonic() - started, 3))
        return final

    def _check_bytes(self, image: tasks_pb2.CachedImageSource, part: Path, size: int,
                     digest: str) -> None:
        problem = ""
        if size != image.size_bytes:
            problem = f"{size} bytes arrived, not {image.size_bytes}"
        elif digest != image.sha256:
            problem = f"its sha256 is {digest}, not {image.sha256}"
        if problem:
            part.unlink(missing_ok=True)
            raise errors.InvalidArgument(
                f"image {image.image_id} did not verify: {problem}", reason=CHECKSUM,
                violations=[errors.FieldViolation("image.sha256", problem)])
        header = read_header(part)
        refusal = ""
        if image.disk_format == "qcow2" and header.format != "qcow2":
            refusal = "it is not qcow2"
        elif header.format == "qcow2" and header.has_backing_file:
            refusal = "it names a backing file"
        if refusal:
            part.unlink(missing_ok=True)
            raise errors.FailedPrecondition(f"image {image.image_id} is refused: {refusal}",
                                            reason=BAD_IMAGE)

    def _marker(self, image_id: str) -> Path:
        return self.directory / f"{volume_name(image_id)}.sha256"


def _resume(part: Path, size: int, hasher: hashlib._Hash) -> int:
    """Bytes already in a part file left by an earlier attempt (hashed into `hasher`)."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        part.unlink()
        return 0
    with part.open("rb") as existing:
        while block := existing.read(_HASH_BLOCK):
            hasher.update(block)
    return have


def _check_record(image: tasks_pb2.CachedImageSource, record: image_pb2.Image) -> None:
    """The image nubis-storage streamed must be the one the task names."""
    if record.checksum_sha256 and record.checksum_sha256 != image.sha256:
        raise errors.InvalidArgument(
            f"image {image.image_id} has sha256 {record.checksum_sha256} in nubis-storage, "
            f"not {image.sha256}", reason=CHECKSUM,
            violations=[errors.FieldViolation("image.sha256", "differs from the image's")])


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()
