"""Domains (guests) of the node as libvirt knows them, with their power state."""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from services.agent.driver.connection import Connection

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class DomainState:
    """One domain: its name, UUID and libvirt state."""

    name: str
    uuid: str
    state: str


class Domains:
    """The node's domains through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def names(self) -> list[str]:
        """Names of every domain libvirt knows on this node."""
        with self._connection.calling("list domains") as conn:
            return sorted(domain.name() for domain in conn.listAllDomains(0))

    def status(self, name: str) -> DomainState:
        """The domain `name` and its power state; NotFound if libvirt has no such domain."""
        with self._connection.calling(f"look up domain {name}") as conn:
            domain = conn.lookupByName(name)
            return DomainState(str(domain.name()), str(domain.UUIDString()),
                               _STATES.get(domain.state()[0], "unknown"))
