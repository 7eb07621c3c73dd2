"""Volumes of the node's storage pools: made, overlaid, copied, grown and deleted through libvirt.

Same calls for every URI. On ``qemu:///system`` a volume is a file in the
pool's directory (qcow2 overlays made by libvirt with ``qemu-img``); on
``test:///default`` a volume is libvirt's in-memory record of one, with no
file behind it. Where the test driver lacks a call (it cannot resize a
volume) the in-memory record is made again with the new size, which is all
a volume there is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import libvirt

from services.agent.driver.connection import Connection

FORMATS = ("qcow2", "raw")
"""Formats a volume can have."""


@dataclass(frozen=True)
class VolumeInfo:
    """One volume as libvirt reports it."""

    name: str
    pool: str
    path: str
    capacity_bytes: int
    """Virtual size: what a guest sees."""
    allocation_bytes: int
    """Bytes it takes in the pool."""
    format: str
    backing_path: str
    """Path of its backing file; "" for a full volume."""


class Volumes:
    """Volumes of the node's pools through the node's connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def in_memory(self) -> bool:
        """True on libvirt's test driver: volumes are records, no file is behind them."""
        with self._connection.calling("read the libvirt driver type") as conn:
            return str(conn.getType()).upper() == "TEST"

    def get(self, pool: str, name: str) -> VolumeInfo | None:
        """The volume `name` of `pool`, or None if the pool has none (NotFound: no pool)."""
        with self._connection.calling(f"look up volume {name} in pool {pool}") as conn:
            found = _lookup(conn.storagePoolLookupByName(pool), name)
            return None if found is None else _info_if_there(pool, found)

    def all(self, pool: str) -> list[VolumeInfo]:
        """Every volume of `pool`, by name; one deleted while the pool is read (another
        task's delete between the listing and its lookup) is left out, as it is gone."""
        with self._connection.calling(f"list the volumes of pool {pool}") as conn:
            handle = conn.storagePoolLookupByName(pool)
            found = (_info_if_there(pool, volume) for volume in handle.listAllVolumes(0))
            return sorted((volume for volume in found if volume is not None),
                          key=lambda volume: volume.name)

    def busy(self, pool: str) -> bool:
        """True while libvirt is still making a volume of `pool` (a copy running): a volume
        found then may not be complete yet. libvirt refuses to refresh such a pool."""
        with self._connection.calling(f"refresh pool {pool}") as conn:
            try:
                conn.storagePoolLookupByName(pool).refresh(0)
            except libvirt.libvirtError as exc:
                if "asynchronous jobs" in str(exc):
                    return True
                raise
            return False

    def dependents(self, pool: str, path: str) -> list[str]:
        """Names of the volumes of `pool` whose backing file is `path`."""
        return [volume.name for volume in self.all(pool) if volume.backing_path == path]

    def create(self, pool: str, name: str, capacity_bytes: int, volume_format: str,
               backing: VolumeInfo | None = None) -> VolumeInfo:
        """A new volume; with `backing`, a thin qcow2 overlay whose backing file it is."""
        xml = _volume_xml(name, capacity_bytes, volume_format, backing=backing)
        with self._connection.calling(f"create volume {name} in pool {pool}") as conn:
            return _info(pool, conn.storagePoolLookupByName(pool).createXML(xml, 0))

    def copy(self, pool: str, source: str, name: str, volume_format: str = "",
             capacity_bytes: int = 0) -> VolumeInfo:
        """A full, independent copy of `source` (libvirt's clone), in `volume_format`
        (default: the source's) and at least `capacity_bytes` (default: the source's)."""
        with self._connection.calling(f"copy volume {source} to {name} in pool {pool}") as conn:
            handle = conn.storagePoolLookupByName(pool)
            origin = handle.storageVolLookupByName(source)
            info = _info(pool, origin)
            capacity = max(capacity_bytes, info.capacity_bytes)
            xml = _volume_xml(name, info.capacity_bytes, volume_format or info.format)
            made = _info(pool, handle.createXMLFrom(xml, origin, 0))
        if made.capacity_bytes < capacity:
            made = self.grow(pool, name, capacity)
        return made

    def grow(self, pool: str, name: str, capacity_bytes: int) -> VolumeInfo:
        """The volume with its virtual size raised to `capacity_bytes` (the caller checked
        it only grows)."""
        with self._connection.calling(f"resize volume {name} in pool {pool}") as conn:
            handle = conn.storagePoolLookupByName(pool)
            volume = handle.storageVolLookupByName(name)
            try:
                volume.resize(capacity_bytes, 0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT or not _is_test(conn):
                    raise
                # The test driver cannot resize; its volume is a record: make it again.
                volume = _remade(handle, volume, capacity_bytes)
            return _info(pool, volume)

    def delete(self, pool: str, name: str) -> bool:
        """Delete the volume; False if it was not there."""
        with self._connection.calling(f"delete volume {name} in pool {pool}") as conn:
            volume = _lookup(conn.storagePoolLookupByName(pool), name)
            if volume is None:
                return False
            try:
                volume.delete(0)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    return False
                raise
            return True

    def adopt_file(self, pool: str, name: str, file: Path, volume_format: str,
                   capacity_bytes: int) -> VolumeInfo:
        """Make the complete file `file` the volume `name` of `pool`.

        With real files the file moves into the pool's directory (a rename
        when both are on one filesystem) and the pool is refreshed so libvirt
        sees it. On the test driver the bytes stay where they are and the
        volume is a record of their size and format.
        """
        with self._connection.calling(f"add volume {name} to pool {pool}") as conn:
            handle = conn.storagePoolLookupByName(pool)
            if _is_test(conn):
                xml = _volume_xml(name, capacity_bytes, volume_format,
                                  allocation_bytes=file.stat().st_size)
                return _info(pool, handle.createXML(xml, 0))
            target = Path(_pool_path(handle)) / name
            _move(file, target)
            handle.refresh(0)
            return _info(pool, handle.storageVolLookupByName(name))


def _is_test(conn: libvirt.virConnect) -> bool:
    return str(conn.getType()).upper() == "TEST"


def _lookup(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def _info_if_there(pool: str, volume: libvirt.virStorageVol) -> VolumeInfo | None:
    """The volume's info, or None if it was deleted since it was looked up or listed."""
    try:
        return _info(pool, volume)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def _pool_path(pool: libvirt.virStoragePool) -> str:
    return ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""


def _info(pool: str, volume: libvirt.virStorageVol) -> VolumeInfo:
    root = ElementTree.fromstring(volume.XMLDesc(0))
    target_format = root.find("target/format")
    # info: [type, capacity, allocation] in bytes
    _, capacity, allocation = volume.info()
    return VolumeInfo(
        name=str(volume.name()), pool=pool, path=str(volume.path()),
        capacity_bytes=int(capacity), allocation_bytes=int(allocation),
        format=target_format.get("type", "") if target_format is not None else "",
        backing_path=root.findtext("backingStore/path") or "",
    )


def _volume_xml(name: str, capacity_bytes: int, volume_format: str, *,
                backing: VolumeInfo | None = None, allocation_bytes: int | None = None) -> str:
    volume = ElementTree.Element("volume", type="file")
    ElementTree.SubElement(volume, "name").text = name
    ElementTree.SubElement(volume, "capacity", unit="bytes").text = str(capacity_bytes)
    # Thin: qcow2 grows as the guest writes, raw files are sparse.
    allocation = 0 if allocation_bytes is None else allocation_bytes
    ElementTree.SubElement(volume, "allocation", unit="bytes").text = str(allocation)
    target = ElementTree.SubElement(volume, "target")
    ElementTree.SubElement(target, "format", type=volume_format)
    if backing is not None:
        store = ElementTree.SubElement(volume, "backingStore")
        ElementTree.SubElement(store, "path").text = backing.path
        ElementTree.SubElement(store, "format", type=backing.format or "raw")
    return ElementTree.tostring(volume, encoding="unicode")


def _remade(pool: libvirt.virStoragePool, volume: libvirt.virStorageVol,
            capacity_bytes: int) -> libvirt.virStorageVol:
    root = ElementTree.fromstring(volume.XMLDesc(0))
    capacity = root.find("capacity")
    if capacity is None:
        capacity = ElementTree.SubElement(root, "capacity")
    capacity.text = str(capacity_bytes)
    capacity.set("unit", "bytes")
    volume.delete(0)
    return pool.createXML(ElementTree.tostring(root, encoding="unicode"), 0)


def _move(source: Path, target: Path) -> None:
    """Move a file into place; across filesystems by a copy beside the target, then a rename."""
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    partial = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    source.unlink()
