"""Storage pools of the node: the pool whose size is the node's disk, and `dir` pools to ensure."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import libvirt

from services.agent.driver.connection import Connection

_GIB = 1024**3


@dataclass(frozen=True)
class PoolInfo:
    """One storage pool as libvirt reports it."""

    name: str
    active: bool
    capacity_bytes: int
    available_bytes: int


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

    def node_capacity_gb(self) -> int:
        """GiB of the node's pool, read fresh; 0 when it is missing or stopped."""
        with self._connection.calling("read the node's storage pool") as conn:
            pool = self._find_node_pool(conn)
            if pool is None or not pool.isActive():
                return 0
            # libvirt caches a pool's size; a refresh sees a grown filesystem.
            pool.refresh(0)
            return int(pool.info()[1]) // _GIB

    def pool(self, name: str) -> PoolInfo | None:
        """The pool named `name`, or None if libvirt has none."""
        with self._connection.calling(f"look up storage pool {name}") as conn:
            try:
                pool = conn.storagePoolLookupByName(name)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    return None
                raise
            return _info(pool)

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
            try:
                return conn.storagePoolLookupByName(self._node_pool)
            except libvirt.libvirtError:
                if not self._node_pool_path:
                    raise
                return _define_dir_pool(conn, self._node_pool, self._node_pool_path)
        names = conn.listStoragePools()
        return conn.storagePoolLookupByName(names[0]) if names else None


def _info(pool: libvirt.virStoragePool) -> PoolInfo:
    # info: [state, capacity, allocation, available] in bytes
    state, capacity, _, available = pool.info()
    return PoolInfo(name=str(pool.name()), active=state == libvirt.VIR_STORAGE_POOL_RUNNING,
                    capacity_bytes=int(capacity), available_bytes=int(available))


def _define_dir_pool(conn: libvirt.virConnect, name: str, path: str) -> libvirt.virStoragePool:
    pool_xml = ElementTree.Element("pool", type="dir")
    ElementTree.SubElement(pool_xml, "name").text = name
    target = ElementTree.SubElement(pool_xml, "target")
    ElementTree.SubElement(target, "path").text = path
    pool = conn.storagePoolDefineXML(ElementTree.tostring(pool_xml, encoding="unicode"), 0)
    pool.build(0)
    pool.create(0)
    pool.setAutostart(1)
    return pool
