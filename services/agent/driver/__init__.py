"""The libvirt driver of a node: the only package in nubis that imports libvirt.

Same code for every URI: ``test:///default`` (embedded, runs anywhere) and
``qemu:///system`` (real guests). One module per area (host facts, storage
pools, volumes, domains, networks), independent of each other, over one
shared connection; `Driver` puts them together for the agent. Capacity is
what libvirt says the host has; disk is the capacity of the node's storage
pool, from the same reading as the pools the node reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.agent.driver import connection, domains, host, network, nwfilter, storage, volumes


@dataclass(frozen=True)
class HostFacts:
    """What the node reports about itself, read from libvirt."""

    vcpus: int
    memory_mb: int
    disk_gb: int
    hypervisor_type: str
    hostname: str
    arch: str
    pools: tuple[storage.PoolInfo, ...] = ()
    """Every storage pool of the node, read with `disk_gb`."""


class Driver:
    """The node's libvirt areas over one connection shared by every task thread."""

    def __init__(self, uri: str, *, storage_pool: str = "", storage_pool_path: str = "") -> None:
        self.uri = uri
        self.connection = connection.Connection(uri)
        self.host = host.Host(self.connection)
        self.storage = storage.Storage(self.connection, storage_pool, storage_pool_path)
        self.volumes = volumes.Volumes(self.connection)
        self.domains = domains.Domains(self.connection)
        self.networks = network.Networks(self.connection)
        self.filters = nwfilter.Filters(self.connection)

    def facts(self) -> HostFacts:
        """vCPUs, memory, pools and pool disk of the host, plus its hypervisor type, read now."""
        info = self.host.info()
        pools = self.storage.reports()
        return HostFacts(
            vcpus=info.vcpus,
            memory_mb=info.memory_mb,
            disk_gb=self.storage.node_disk_gb(pools),
            pools=tuple(pools),
            hypervisor_type=info.hypervisor_type,
            hostname=info.hostname,
            arch=info.arch,
        )

    def domain_names(self) -> list[str]:
        """Names of every domain libvirt knows on this node."""
        return self.domains.names()

    def close(self) -> None:
        self.connection.close()
