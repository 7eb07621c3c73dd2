"""The libvirt driver of a node: the only module in nubis that imports libvirt.

Same code for every URI: ``test:///default`` (embedded, runs anywhere) and
``qemu:///system`` (real guests). Capacity is what libvirt says the host has;
disk is the capacity of the node's storage pool.
"""

from __future__ import annotations

import contextlib
import threading
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

import libvirt

from services.common import errors

_GIB = 1024**3


@dataclass(frozen=True)
class HostFacts:
    """What the node reports about itself, read from libvirt."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    hypervisor_type: str
    hostname: str
    arch: str


class Driver:
    """One libvirt connection shared by every task thread of the agent."""

    def __init__(self, uri: str, *, storage_pool: str = "", storage_pool_path: str = "") -> None:
        self.uri = uri
        self._storage_pool = storage_pool
        self._storage_pool_path = storage_pool_path
        # libvirt connections are thread-safe, but (re)opening is guarded so
        # two task threads never open two connections at once.
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def connection(self) -> libvirt.virConnect:
        """The live connection, reopened if libvirt dropped it."""
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise errors.Unavailable(f"cannot open libvirt at {self.uri}: {exc}") from exc
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def facts(self) -> HostFacts:
        """vCPUs, memory and pool disk of the host, plus its hypervisor type."""
        try:
            conn = self.connection()
            # getInfo: [model, memory MiB, cpus, mhz, numa nodes, sockets, cores, threads]
            info = conn.getInfo()
            return HostFacts(
                vcpus=int(info[2]),
                memory_mb=int(info[1]),
                disk_gb=self._pool_capacity_gb(conn),
                hypervisor_type=str(conn.getType()),
                hostname=str(conn.getHostname()),
                arch=str(info[0]),
            )
        except libvirt.libvirtError as exc:
            raise errors.Unavailable(f"libvirt at {self.uri} failed: {exc}") from exc

    def _pool_capacity_gb(self, conn: libvirt.virConnect) -> int:
        pool = self._find_pool(conn)
        if pool is None:
            return 0
        # info: [state, capacity, allocation, available] in bytes
        return int(pool.info()[1]) // _GIB

    def _find_pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool | None:
        if self._storage_pool:
            try:
                return conn.storagePoolLookupByName(self._storage_pool)
            except libvirt.libvirtError:
                if not self._storage_pool_path:
                    raise
                return self._define_dir_pool(conn, self._storage_pool, self._storage_pool_path)
        names = conn.listStoragePools()
        return conn.storagePoolLookupByName(names[0]) if names else None

    def _define_dir_pool(
        self, conn: libvirt.virConnect, name: str, path: str
    ) -> libvirt.virStoragePool:
        pool_xml = ElementTree.Element("pool", type="dir")
        ElementTree.SubElement(pool_xml, "name").text = name
        target = ElementTree.SubElement(pool_xml, "target")
        ElementTree.SubElement(target, "path").text = path
        pool = conn.storagePoolDefineXML(ElementTree.tostring(pool_xml, encoding="unicode"), 0)
        pool.build(0)
        pool.create(0)
        pool.setAutostart(1)
        return pool

    def domain_names(self) -> list[str]:
        """Names of every domain libvirt knows on this node."""
        try:
            conn = self.connection()
            return sorted(domain.name() for domain in conn.listAllDomains(0))
        except libvirt.libvirtError as exc:
            raise errors.Unavailable(f"libvirt at {self.uri} failed: {exc}") from exc
