"""Storage tasks: the node's pools, its image cache and its volumes, each idempotent.

Every task reads libvirt first (check prerequisites) and finds a repeat done:
a volume there with the asked size, a snapshot there, a volume gone, an
image cached with its checksum. So a task the broker delivers again (the
agent died mid-task, acks_late) converges on one volume, never two. Tasks on
one volume run one after the other (the phase lock); a fetch of one image,
from fetch_image or from an ensure_volume needing it, holds that image's lock.
"""

from __future__ import annotations

import os
import posixpath
import re
import time
import uuid
from pathlib import Path
from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent import image_cache
from services.agent.driver import storage as storage_driver
from services.agent.driver import volumes as volume_driver
from services.agent.tasks import phases
from services.common import errors, tasks
from services.common.settings import Settings

_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
IMAGE_FORMATS = ("qcow2", "raw", "kernel", "ramdisk")
"""Formats of a cached image; volumes are made only from the disk ones."""
_DISK_IMAGE_FORMATS = ("qcow2", "raw")
_SECTOR = 512  # qemu-img rounds a size up to whole sectors

MISMATCH = "nubis.agent.volume_mismatch"
IN_USE = "nubis.agent.volume_in_use"
SHRINK = "nubis.agent.volume_shrink"
TOO_SMALL = "nubis.agent.volume_too_small"
MISSING = "nubis.agent.volume_not_found"
BUILDING = "nubis.agent.volume_building"
_SETTLE_PAUSE = 0.5
DEFAULT_CACHE_ROOT = "/var/lib/nubis/image-cache"
"""Where a node's image cache is when agent.image_cache_path is empty (one directory per node)."""


class NodeStorage:
    """What the storage tasks share: the driver's pools and volumes, and the image cache."""

    def __init__(self, driver: driver_module.Driver, settings: Settings, node: str) -> None:
        self.pools = driver.storage
        self.volumes = driver.volumes
        directory = settings.agent.image_cache_path or f"{DEFAULT_CACHE_ROOT}/{node}"
        self.downloader = image_cache.Downloader(settings)
        """Streams images from nubis-storage; `warm` logs it in at the agent's start."""
        self.images = image_cache.ImageFiles(Path(directory), self.downloader)
        self._image_locks = phases.Locks()
        self._known_images: dict[tuple[str, str], tuple[str, volume_driver.VolumeInfo]] = {}

    def pool(self, name: str) -> str:
        """The pool a request names ("" = the node's own pool)."""
        return name or self.pools.node_pool_name()

    def lock_key(self, pool: str, volume: str) -> str:
        """The lock of one volume, the same whether its pool is named or left ""."""
        return f"storage-volume/{pool or self.pools.configured_node_pool}/{volume}"

    def volume(self, pool: str, name: str) -> volume_driver.VolumeInfo:
        """The volume, or NotFound saying so."""
        found = self.volumes.get(pool, name)
        if found is None:
            raise errors.NotFound(f"pool {pool} has no volume {name}", reason=MISSING,
                                  metadata={"pool": pool, "volume": name})
        return found

    def complete(self, pool: str, name: str, deadline: float) -> volume_driver.VolumeInfo | None:
        """The volume if it exists, once libvirt is no longer making it: a task delivered
        again while the copy its first delivery started still runs waits for that copy."""
        found = self.volumes.get(pool, name)
        while found is not None and self.volumes.busy(pool):
            if time.time() + _SETTLE_PAUSE >= deadline:
                raise errors.Unavailable(f"volume {name} is still being made in pool {pool}",
                                         reason=BUILDING, metadata={"pool": pool, "volume": name})
            time.sleep(_SETTLE_PAUSE)
            found = self.volumes.get(pool, name)
        return found

    def cached_image(self, pool: str,
                     image: tasks_pb2.CachedImageSource) -> volume_driver.VolumeInfo | None:
        """The pool's image-<id> if it holds exactly the image's bytes, else None."""
        found = self.volumes.get(pool, image_cache.volume_name(image.image_id))
        return found if found is not None and self.images.marked(image) else None

    def ensure_image(self, pool: str, image: tasks_pb2.CachedImageSource,
                     deadline: float) -> tuple[volume_driver.VolumeInfo, bool]:
        """The image cached in `pool` (fetched now if it is not); True if this fetched it."""
        name = image_cache.volume_name(image.image_id)
        # Images never change: one marked and present is used without the fetch's lock,
        # so the spawns and root disks of one image do not queue behind each other; one this
        # agent found before is not asked of libvirt again while its file is there (six
        # calls a volume, slow on a libvirtd busy starting guests).
        if self.images.marked(image):
            known = self._known_images.get((pool, name))
            if known is not None and known[0] == image.sha256 and os.path.exists(known[1].path):
                return known[1], False
            found = self.volumes.get(pool, name)
            if found is not None:
                self._known_images[(pool, name)] = (image.sha256, found)
                return found, False
        with self._image_locks.hold(f"{pool}/{name}", deadline):
            found = self.volumes.get(pool, name)
            if found is not None and self.images.marked(image):
                return found, False
            if found is not None:
                found = self._leftover(pool, found, image)
                if found is not None:
                    return found, False
            path = self.images.verified_file(image)  # kept here by a test-driver node
            if path is None:
                path = self.images.download(image, deadline)
            capacity = image_cache.read_header(path).virtual_size
            volume = self.volumes.adopt_file(pool, name, path, _volume_format(image),
                                             capacity)
            self.images.mark(image)
            return volume, True

    def forget_image(self, pool: str, name: str) -> None:
        """The cached image volume `name` of `pool` is gone: its files and what was known."""
        self._known_images.pop((pool, name), None)
        self.images.forget(name.removeprefix("image-"))

    def _leftover(self, pool: str, found: volume_driver.VolumeInfo,
                  image: tasks_pb2.CachedImageSource) -> volume_driver.VolumeInfo | None:
        """An image volume without its marker: a fetch that stopped between adding the
        volume and marking it. Volumes already on it vouch for it; else it goes. One checked
        against other bytes is not this image (images never change): refused."""
        checked = self.images.marker(image.image_id)
        if checked is not None:
            raise errors.FailedPrecondition(
                f"image {image.image_id} is cached with sha256 {checked}, not {image.sha256}",
                reason=image_cache.BAD_IMAGE,
                metadata={"pool": pool, "image_id": image.image_id})
        if self.volumes.dependents(pool, found.path):
            self.images.mark(image)
            return found
        self.volumes.delete(pool, found.name)
        return None


def _volume_format(image: tasks_pb2.CachedImageSource) -> str:
    return "qcow2" if image.disk_format == "qcow2" else "raw"


def _round(capacity: int) -> int:
    return -(-capacity // _SECTOR) * _SECTOR


def _check_pool(problems: errors.ViolationCollector, field: str, name: str) -> None:
    if name and not _POOL_NAME.fullmatch(name):
        problems.add(field, "1-64 letters, digits, '.', '_' or '-', not first")


def _check_volume(problems: errors.ViolationCollector, field: str, name: str) -> None:
    if not _VOLUME_NAME.fullmatch(name) or name.endswith(".part"):
        problems.add(field, "1-128 letters, digits, '.', '_' or '-', not first")


def _check_image(problems: errors.ViolationCollector, field: str,
                 image: tasks_pb2.CachedImageSource, formats: tuple[str, ...]) -> None:
    try:
        uuid.UUID(image.image_id)
    except ValueError:
        problems.add(f"{field}.image_id", "must be a UUID")
    if image.size_bytes <= 0:
        problems.add(f"{field}.size_bytes", "must be positive")
    if not _SHA256.fullmatch(image.sha256):
        problems.add(f"{field}.sha256", "must be 64 lower-case hex digits")
    if image.disk_format not in formats:
        problems.add(f"{field}.disk_format", f"must be one of {', '.join(formats)}")


def _message(volume: volume_driver.VolumeInfo) -> tasks_pb2.StorageVolume:
    backing_volume = ""
    if volume.backing_path and posixpath.dirname(volume.backing_path) == posixpath.dirname(
            volume.path):
        backing_volume = posixpath.basename(volume.backing_path)
    return tasks_pb2.StorageVolume(
        name=volume.name, pool=volume.pool, path=volume.path,
        capacity_bytes=volume.capacity_bytes, allocation_bytes=volume.allocation_bytes,
        format=volume.format, backing_path=volume.backing_path, backing_volume=backing_volume)


class _StorageTask(phases.AgentTask[tasks.Req, tasks.Resp]):
    def __init__(self, storage: NodeStorage) -> None:
        self._storage = storage


class EnsurePool(phases.AgentTask[tasks_pb2.EnsurePoolRequest, tasks_pb2.EnsurePoolResponse]):
    """A `dir` pool exists and runs: defined and started if not, left alone if it does."""

    spec = tasks.ENSURE_POOL

    def __init__(self, driver: driver_module.Driver) -> None:
        self._storage = driver.storage

    def check_arguments(self, request: tasks_pb2.EnsurePoolRequest) -> None:
        problems = errors.ViolationCollector()
        if not _POOL_NAME.fullmatch(request.name):
            problems.add("name", "1-64 letters, digits, '.', '_' or '-', not first")
        if not posixpath.isabs(request.path) or posixpath.normpath(request.path) != request.path:
            problems.add("path", "must be a normalized absolute directory")
        problems.check(f"cannot ensure pool {request.name!r}")

    def lock_key(self, request: tasks_pb2.EnsurePoolRequest) -> str:
        return f"storage-pool/{request.name}"

    def check_prerequisites(self, request: tasks_pb2.EnsurePoolRequest,
                            ctx: phases.Context) -> tasks_pb2.EnsurePoolResponse | None:
        pool = self._storage.pool(request.name)
        if pool is None or not pool.active:
            return None
        return _ensured(pool, changed=False)

    def execute(self, request: tasks_pb2.EnsurePoolRequest,
                ctx: phases.Context) -> tasks_pb2.EnsurePoolResponse:
        self._storage.ensure_dir_pool(request.name, request.path)
        pool = self._storage.pool(request.name)
        if pool is None:
            raise errors.Unavailable(f"storage pool {request.name} vanished after it was made",
                                     reason="nubis.agent.libvirt_unavailable")
        return _ensured(pool, changed=True)


def _ensured(pool: storage_driver.PoolInfo, *, changed: bool) -> tasks_pb2.EnsurePoolResponse:
    return tasks_pb2.EnsurePoolResponse(name=pool.name, changed=changed,
                                        capacity_bytes=pool.capacity_bytes,
                                        available_bytes=pool.available_bytes)


class PoolInfo(_StorageTask[tasks_pb2.PoolInfoRequest, tasks_pb2.StoragePoolInfo]):
    """The pool as libvirt reports it after a refresh."""

    spec = tasks.POOL_INFO

    def check_arguments(self, request: tasks_pb2.PoolInfoRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        problems.check("cannot read the pool")

    def execute(self, request: tasks_pb2.PoolInfoRequest,
                ctx: phases.Context) -> tasks_pb2.StoragePoolInfo:
        name = self._storage.pool(request.pool)
        pool = self._storage.pools.pool(name, refresh=True)
        if pool is None:
            raise errors.NotFound(f"the node has no storage pool {name}",
                                  reason="nubis.agent.pool_not_found", metadata={"pool": name})
        return tasks_pb2.StoragePoolInfo(
            name=pool.name, path=pool.path, capacity_bytes=pool.capacity_bytes,
            allocation_bytes=pool.allocation_bytes, available_bytes=pool.available_bytes,
            active=pool.active, volume_count=pool.volume_count)


class VolumeInfo(_StorageTask[tasks_pb2.VolumeInfoRequest, tasks_pb2.VolumeInfoResponse]):
    """One volume as libvirt reports it now, or that there is none."""

    spec = tasks.VOLUME_INFO

    def check_arguments(self, request: tasks_pb2.VolumeInfoRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_volume(problems, "name", request.name)
        problems.check("cannot read the volume")

    def execute(self, request: tasks_pb2.VolumeInfoRequest,
                ctx: phases.Context) -> tasks_pb2.VolumeInfoResponse:
        found = self._storage.volumes.get(self._storage.pool(request.pool), request.name)
        if found is None:
            return tasks_pb2.VolumeInfoResponse(found=False)
        return tasks_pb2.VolumeInfoResponse(found=True, volume=_message(found))


class FetchImage(_StorageTask[tasks_pb2.FetchImageRequest, tasks_pb2.FetchImageResponse]):
    """The image is in the node's cache: downloaded once, checked, added to the pool."""

    spec = tasks.FETCH_IMAGE

    def check_arguments(self, request: tasks_pb2.FetchImageRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_image(problems, "image", request.image, IMAGE_FORMATS)
        problems.check("cannot fetch the image")

    def lock_key(self, request: tasks_pb2.FetchImageRequest) -> str:
        return ""  # the image's own lock, which ensure_volume takes too, is held inside

    def check_prerequisites(self, request: tasks_pb2.FetchImageRequest,
                            ctx: phases.Context) -> tasks_pb2.FetchImageResponse | None:
        found = self._storage.cached_image(self._storage.pool(request.pool), request.image)
        return None if found is None else tasks_pb2.FetchImageResponse(volume=_message(found))

    def execute(self, request: tasks_pb2.FetchImageRequest,
                ctx: phases.Context) -> tasks_pb2.FetchImageResponse:
        volume, changed = self._storage.ensure_image(self._storage.pool(request.pool),
                                                     request.image, ctx.deadline)
        return tasks_pb2.FetchImageResponse(volume=_message(volume), changed=changed)


class EnsureVolume(_StorageTask[tasks_pb2.EnsureVolumeRequest, tasks_pb2.EnsureVolumeResponse]):
    """A volume of this size exists: blank, a thin overlay on an image or a volume, or a copy."""

    spec = tasks.ENSURE_VOLUME

    def check_arguments(self, request: tasks_pb2.EnsureVolumeRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_volume(problems, "name", request.name)
        has_image = request.HasField("backing_image")
        if request.format not in ("", *volume_driver.FORMATS):
            problems.add("format", "must be qcow2 or raw")
        if has_image and request.backing_volume:
            problems.add("backing_volume", "give a backing image or a backing volume, not both")
        if has_image:
            _check_image(problems, "backing_image", request.backing_image, _DISK_IMAGE_FORMATS)
        if request.backing_volume:
            _check_volume(problems, "backing_volume", request.backing_volume)
        if request.capacity_bytes < 0 or (
                request.capacity_bytes == 0 and not has_image and not request.backing_volume):
            problems.add("capacity_bytes", "must be positive (0 only with a backing)")
        problems.check(f"cannot make volume {request.name!r}")

    def lock_key(self, request: tasks_pb2.EnsureVolumeRequest) -> str:
        return self._storage.lock_key(request.pool, request.name)

    def check_prerequisites(self, request: tasks_pb2.EnsureVolumeRequest,
                            ctx: phases.Context) -> tasks_pb2.EnsureVolumeResponse | None:
        pool = self._storage.pool(request.pool)
        found = self._storage.complete(pool, request.name, ctx.deadline)
        if found is None:
            return None
        wanted_format = request.format or "qcow2"
        other_size = bool(request.capacity_bytes) and (
            found.capacity_bytes != _round(request.capacity_bytes))
        if other_size or found.format != wanted_format:
            raise errors.FailedPrecondition(
                f"volume {request.name} exists with {found.capacity_bytes} bytes of "
                f"{found.format}, not {request.capacity_bytes} of {wanted_format}",
                reason=MISMATCH, metadata={"pool": pool, "volume": request.name})
        return tasks_pb2.EnsureVolumeResponse(volume=_message(found), changed=False)

    def execute(self, request: tasks_pb2.EnsureVolumeRequest,
                ctx: phases.Context) -> tasks_pb2.EnsureVolumeResponse:
        storage = self._storage
        pool = storage.pool(request.pool)
        volume_format = request.format or "qcow2"
        backing: volume_driver.VolumeInfo | None = None
        if request.HasField("backing_image"):
            backing, _ = storage.ensure_image(pool, request.backing_image, ctx.deadline)
        elif request.backing_volume:
            backing = storage.volume(pool, request.backing_volume)
        capacity = request.capacity_bytes or (backing.capacity_bytes if backing else 0)
        if backing is not None and capacity < backing.capacity_bytes:
            raise errors.FailedPrecondition(
                f"volume {request.name} of {capacity} bytes cannot hold {backing.name} of "
                f"{backing.capacity_bytes}", reason=TOO_SMALL,
                metadata={"pool": pool, "volume": request.name, "backing": backing.name})
        if backing is None:
            made = storage.volumes.create(pool, request.name, capacity, volume_format)
        elif volume_format == "qcow2":
            made = storage.volumes.create(pool, request.name, capacity, "qcow2", backing=backing)
        else:  # raw cannot point at a backing file: a full copy
            made = storage.volumes.copy(pool, backing.name, request.name, "raw", capacity)
        return tasks_pb2.EnsureVolumeResponse(volume=_message(made), changed=True)


class DeleteVolume(_StorageTask[tasks_pb2.DeleteVolumeRequest, tasks_pb2.DeleteVolumeResponse]):
    """The volume is gone; refused while another volume of the pool is backed by it."""

    spec = tasks.DELETE_VOLUME

    def check_arguments(self, request: tasks_pb2.DeleteVolumeRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_volume(problems, "name", request.name)
        problems.check(f"cannot delete volume {request.name!r}")

    def lock_key(self, request: tasks_pb2.DeleteVolumeRequest) -> str:
        return self._storage.lock_key(request.pool, request.name)

    def check_prerequisites(self, request: tasks_pb2.DeleteVolumeRequest,
                            ctx: phases.Context) -> tasks_pb2.DeleteVolumeResponse | None:
        pool = self._storage.pool(request.pool)
        found = self._storage.volumes.get(pool, request.name)
        if found is None:
            return tasks_pb2.DeleteVolumeResponse(changed=False)
        dependents = self._storage.volumes.dependents(pool, found.path)
        if dependents:
            raise errors.FailedPrecondition(
                f"volume {request.name} backs {', '.join(dependents)}", reason=IN_USE,
                metadata={"pool": pool, "volume": request.name,
                          "dependents": ",".join(dependents)})
        return None

    def execute(self, request: tasks_pb2.DeleteVolumeRequest,
                ctx: phases.Context) -> tasks_pb2.DeleteVolumeResponse:
        pool = self._storage.pool(request.pool)
        deleted = self._storage.volumes.delete(pool, request.name)
        if request.name.startswith("image-"):
            self._storage.forget_image(pool, request.name)
        return tasks_pb2.DeleteVolumeResponse(changed=deleted)


class ResizeVolume(_StorageTask[tasks_pb2.ResizeVolumeRequest, tasks_pb2.ResizeVolumeResponse]):
    """The volume has at least this virtual size: grown, never shrunk."""

    spec = tasks.RESIZE_VOLUME

    def check_arguments(self, request: tasks_pb2.ResizeVolumeRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_volume(problems, "name", request.name)
        if request.capacity_bytes <= 0:
            problems.add("capacity_bytes", "must be positive")
        problems.check(f"cannot resize volume {request.name!r}")

    def lock_key(self, request: tasks_pb2.ResizeVolumeRequest) -> str:
        return self._storage.lock_key(request.pool, request.name)

    def check_prerequisites(self, request: tasks_pb2.ResizeVolumeRequest,
                            ctx: phases.Context) -> tasks_pb2.ResizeVolumeResponse | None:
        pool = self._storage.pool(request.pool)
        found = self._storage.volume(pool, request.name)
        wanted = _round(request.capacity_bytes)
        if found.capacity_bytes > wanted:
            raise errors.FailedPrecondition(
                f"volume {request.name} has {found.capacity_bytes} bytes; it only grows, "
                f"not to {request.capacity_bytes}", reason=SHRINK,
                metadata={"pool": pool, "volume": request.name})
        if found.capacity_bytes == wanted:
            return tasks_pb2.ResizeVolumeResponse(volume=_message(found), changed=False)
        return None

    def execute(self, request: tasks_pb2.ResizeVolumeRequest,
                ctx: phases.Context) -> tasks_pb2.ResizeVolumeResponse:
        grown = self._storage.volumes.grow(self._storage.pool(request.pool), request.name,
                                           _round(request.capacity_bytes))
        return tasks_pb2.ResizeVolumeResponse(volume=_message(grown), changed=True)


class SnapshotVolume(_StorageTask[tasks_pb2.SnapshotVolumeRequest,
                                  tasks_pb2.SnapshotVolumeResponse]):
    """An external snapshot: a full copy of the volume made by libvirt's clone."""

    spec = tasks.SNAPSHOT_VOLUME

    def check_arguments(self, request: tasks_pb2.SnapshotVolumeRequest) -> None:
        problems = errors.ViolationCollector()
        _check_pool(problems, "pool", request.pool)
        _check_volume(problems, "volume_name", request.volume_name)
        _check_volume(problems, "snapshot_name", request.snapshot_name)
        if request.volume_name == request.snapshot_name:
            problems.add("snapshot_name", "must differ from the volume's name")
        problems.check(f"cannot snapshot volume {request.volume_name!r}")

    def lock_key(self, request: tasks_pb2.SnapshotVolumeRequest) -> str:
        # The source's lock: no resize or delete of it runs while it is copied.
        return self._storage.lock_key(request.pool, request.volume_name)

    def check_prerequisites(self, request: tasks_pb2.SnapshotVolumeRequest,
                            ctx: phases.Context) -> tasks_pb2.SnapshotVolumeResponse | None:
        pool = self._storage.pool(request.pool)
        found = self._storage.complete(pool, request.snapshot_name, ctx.deadline)
        if found is not None:
            return tasks_pb2.SnapshotVolumeResponse(snapshot=_message(found), changed=False)
        self._storage.volume(pool, request.volume_name)
        return None

    def execute(self, request: tasks_pb2.SnapshotVolumeRequest,
                ctx: phases.Context) -> tasks_pb2.SnapshotVolumeResponse:
        copy = self._storage.volumes.copy(self._storage.pool(request.pool),
                                          request.volume_name, request.snapshot_name)
        return tasks_pb2.SnapshotVolumeResponse(snapshot=_message(copy), changed=True)


def all_tasks(driver: driver_module.Driver, settings: Settings, node: str,
              shared: NodeStorage | None = None) -> list[phases.AgentTask[Any, Any]]:
    """The storage tasks over `shared` (the node's image cache, which other tasks use too)."""
    storage = shared if shared is not None else NodeStorage(driver, settings, node)
    return [EnsurePool(driver), PoolInfo(storage), VolumeInfo(storage), FetchImage(storage),
            EnsureVolume(storage), DeleteVolume(storage), ResizeVolume(storage),
            SnapshotVolume(storage)]
