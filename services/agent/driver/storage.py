"""Storage pools of the node: its own `dir` pool (ensured at start, its size the node's disk),
and every pool as libvirt reports it after a refresh."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, replace

import libvirt

from services.agent.driver.connection import Connection
from services.common import errors

_GIB = 1024**3


@dataclass(frozen=True)
class PoolInfo:
    """One storage pool as libvirt reports it."""

    name: str
    active: bool
    capacity_bytes: int
    available_bytes: int
    allocation_bytes: int = 0
    path: str = ""
    volume_count: int = 0
    node_pool: bool = False
    """True for the node's own pool: its capacity is the node's disk and volumes go to it
    unless a caller names another pool."""


class Storage:
    """Storage pools through the node's connection.

    `node_pool` and `node_pool_path` name the pool the node reports as its
    disk (empty: the first running pool) and where to define it if missing.
    """

    def __init__(self, connection: Connection, node_pool: str = "",
                 node_pool_path: str = "") -> None:
        self._connection = connection
        self._node_pool = node_pool
        self._node_pool_path = node_pool_path

    @property
    def configured_node_pool(self) -> str:
        """The node pool's name from the settings ("" = the first running pool)."""
        return self._node_pool

    def node_pool_name(self) -> str:
        """Name of the node's own pool (the first running pool when none is configured)."""
        if self._node_pool:
            return self._node_pool
        with self._connection.calling("list storage pools") as conn:
            names = sorted(conn.listStoragePools())
        if not names:
            raise errors.FailedPrecondition("the node has no running storage pool",
                                            reason="nubis.agent.no_storage_pool")
        return str(names[0])

    def ensure_node_pool(self) -> bool:
        """Define (directory made if missing), build and start the node's pool if needed;
        True if anything changed. Nothing to do when no pool is configured."""
        if not self._node_pool or not self._node_pool_path:
            return False
        return self.ensure_dir_pool(self._node_pool, self._node_pool_path)

    def ensure_dir_pool(self, name: str, path: str) -> bool:
        """The `dir` pool `name` exists, runs and starts with libvirt; True if this changed it."""
        with self._connection.calling(f"ensure storage pool {name}") as conn:
            pool = _find(conn, name)
            if pool is None:
                _define_dir_pool(conn, name, path)
                return True
            if pool.isActive():
                return False
            pool.build(0)  # the directory again, if someone removed it
            pool.create(0)
            pool.setAutostart(1)
            return True

    def node_capacity_gb(self) -> int:
        """GiB of the node's pool, read fresh; 0 when it is missing or stopped."""
        with self._connection.calling("read the node's storage pool") as conn:
            pool = self._find_node_pool(conn)
            if pool is None or not pool.isActive():
                return 0
            return _read(pool, refresh=True).capacity_bytes // _GIB

    def node_disk_gb(self, pools: list[PoolInfo]) -> int:
        """GiB of the node's pool within a reading of `pools`; 0 if missing or stopped."""
        found = next((p for p in pools if p.node_pool), None)
        return found.capacity_bytes // _GIB if found is not None and found.active else 0

    def reports(self) -> list[PoolInfo]:
        """Every pool of the node (running ones refreshed first), by name, the node's own
        pool marked `node_pool`.

        The node's own pool is defined first if it is configured and missing,
        as the disk it reports needs it.
        """
        with self._connection.calling("read the node's storage pools") as conn:
            self._find_node_pool(conn)
            pools = sorted((_read(pool, refresh=True) for pool in conn.listAllStoragePools(0)),
                           key=lambda pool: pool.name)
        own = self._node_pool or next((p.name for p in pools if p.active), "")
        return [replace(p, node_pool=True) if p.name == own else p for p in pools]

    def pool(self, name: str, *, refresh: bool = False) -> PoolInfo | None:
        """The pool named `name` (refreshed first if asked and running), or None if none."""
        with self._connection.calling(f"look up storage pool {name}") as conn:
            pool = _find(conn, name)
            return None if pool is None else _read(pool, refresh=refresh)

    def define_dir_pool(self, name: str, path: str) -> None:
        """Define, build, start and autostart a `dir` pool at `path`."""
        with self._connection.calling(f"define storage pool {name}") as conn:
            _define_dir_pool(conn, name, path)

    def start_pool(self, name: str) -> None:
        """Start the defined pool `name` and mark it autostart."""
        with self._connection.calling(f"start storage pool {name}") as conn:
            pool = conn.storagePoolLookupByName(name)
            pool.create(0)
            pool.setAutostart(1)

    def _find_node_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool | None:
        if self._node_pool:
            found = _find(conn, self._node_pool)
            if found is not None or not self._node_pool_path:
                return found
            return _define_dir_pool(conn, self._node_pool, self._node_pool_path)
        names = sorted(conn.listStoragePools())
        return conn.storagePoolLookupByName(names[0]) if names else None


def _find(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    try:
        return conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise


def _read(pool: libvirt.virStoragePool, *, refresh: bool) -> PoolInfo:
    # libvirt caches a pool's sizes and volumes; a refresh sees a grown
    # filesystem and files written beside libvirt. A pool busy making a
    # volume refuses a refresh: its cached numbers stand until the next reading.
    if refresh and pool.isActive():
        try:
            pool.refresh(0)
        except libvirt.libvirtError as exc:
            if "asynchronous jobs" not in str(exc):
                raise
    # info: [state, capacity, allocation, available] in bytes
    state, capacity, allocation, available = pool.info()
    active = state == libvirt.VIR_STORAGE_POOL_RUNNING
    path = ElementTree.fromstring(pool.XMLDesc(0)).findtext("target/path") or ""
    return PoolInfo(name=str(pool.name()), active=active, capacity_bytes=int(capacity),
                    available_bytes=int(available), allocation_bytes=int(allocation),
                    path=path, volume_count=int(pool.numOfVolumes()) if active else 0)


def _define_dir_pool(conn: libvirt.virConnect, name: str, path: str) -> libvirt.virStoragePool:
    pool_xml = ElementTree.Element("pool", type="dir")
    ElementTree.SubElement(pool_xml, "name").text = name
    target = ElementTree.SubElement(pool_xml, "target")
    ElementTree.SubElement(target, "path").text = path
    pool = conn.storagePoolDefineXML(ElementTree.tostring(pool_xml, encoding="unicode"), 0)
    pool.build(0)  # makes the directory on a real host
    pool.create(0)
    pool.setAutostart(1)
    return pool
