"""Host facts of the node as libvirt reports them: CPUs, memory, hypervisor type."""

from __future__ import annotations

from dataclasses import dataclass

from services.agent.driver.connection import Connection


@dataclass(frozen=True)
class HostInfo:
    """What libvirt says about the machine itself."""

    vcpus: int
    memory_mb: int
    hypervisor_type: str
    hostname: str
    arch: str


class Host:
    """Reads the host's facts through the node's connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def info(self) -> HostInfo:
        with self._connection.calling("read the host's facts") as conn:
            # getInfo: [model, memory MiB, cpus, mhz, numa nodes, sockets, cores, threads]
            info = conn.getInfo()
            return HostInfo(
                vcpus=int(info[2]),
                memory_mb=int(info[1]),
                hypervisor_type=str(conn.getType()),
                hostname=str(conn.getHostname()),
                arch=str(info[0]),
            )
