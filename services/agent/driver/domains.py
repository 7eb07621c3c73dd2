"""Domains (guests) of the node as libvirt knows them: their power state, and the calls that
define, start, stop, undefine, hot-plug and migrate them.

Each call is one libvirt step; the compute tasks compose them and decide what
is already done. A domain's instance comes from its nubis metadata
(`domain_xml`), so a domain nubis did not make has none. Where the test
driver lacks a call (hot-plug), the domain's persistent definition is
changed instead: the device is there from the next start, as a guest that
cannot take it live would have it.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import libvirt

from services.agent.driver import domain_xml
from services.agent.driver.connection import Connection
from services.common import errors

T = TypeVar("T")

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
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
"""States of a domain that has a live guest process (destroy ends it)."""
RUNNING_STATES = frozenset({"running", "blocked"})
"""States in which the guest runs."""

_POLL = 0.2
# nvram and managed-save images go with the domain; drivers without them
# (the test driver refuses the nvram flag) undefine without the flags.
_UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                   | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                   | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
_MIGRATE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
                  | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
_FILE_ERROR_DOMAINS = frozenset({libvirt.VIR_FROM_STORAGE, libvirt.VIR_FROM_SECURITY})
_UNSUPPORTED = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})

MIGRATION_UNSUPPORTED = "nubis.agent.live_migration_unsupported"
VIRT_TYPE_UNAVAILABLE = "nubis.agent.virt_type_unavailable"


@dataclass(frozen=True)
class DomainState:
    """One domain: its name, UUID, libvirt state and the instance its metadata names."""

    name: str
    uuid: str
    state: str
    instance_id: str = ""
    persistent: bool = True

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


@dataclass(frozen=True)
class Hypervisor:
    """What libvirt offers hvm guests here: the domain type chosen and the architecture."""

    domain_type: str
    arch: str
    offered: tuple[str, ...]
    """Every domain type libvirt offers for that architecture."""


class Domains:
    """The node's domains through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @property
    def is_test(self) -> bool:
        """True on libvirt's test driver (domains in the agent's memory, no guests)."""
        with self._connection.calling("read the driver type") as conn:
            return str(conn.getType()).upper() == "TEST"

    def names(self) -> list[str]:
        """Names of every domain libvirt knows on this node."""
        with self._connection.calling("list domains") as conn:
            return sorted(domain.name() for domain in conn.listAllDomains(0))

    def all(self) -> list[DomainState]:
        """Every domain libvirt knows, sorted by name."""
        with self._connection.calling("list domains") as conn:
            found = [_state(domain) for domain in conn.listAllDomains(0)]
        return sorted(found, key=lambda domain: domain.name)

    def status(self, name: str) -> DomainState:
        """The domain `name` and its power state; NotFound if libvirt has no such domain."""
        with self._connection.calling(f"look up domain {name}") as conn:
            return _state(conn.lookupByName(name))

    def find(self, name: str) -> DomainState | None:
        """The domain `name`, or None if libvirt has none."""
        return _missing_is_none(lambda: self.status(name))

    def find_uuid(self, uuid: str) -> DomainState | None:
        """The domain with this UUID, or None."""
        def lookup() -> DomainState:
            with self._connection.calling(f"look up domain {uuid}") as conn:
                return _state(conn.lookupByUUIDString(uuid))
        return _missing_is_none(lookup)

    def hypervisor(self, virt_type: str = "") -> Hypervisor:
        """The domain type for new domains: `virt_type` if given (and offered), else kvm where
        libvirt offers it (/dev/kvm usable), else qemu (TCG), else whatever the driver has."""
        with self._connection.calling("read the capabilities") as conn:
            capabilities = str(conn.getCapabilities())
        arch, offered = _hvm_offer(capabilities)
        if virt_type:
            if virt_type not in offered:
                raise errors.FailedPrecondition(
                    f"libvirt offers {', '.join(offered) or 'no'} domains for {arch} hvm "
                    f"guests, not the configured {virt_type}",
                    reason=VIRT_TYPE_UNAVAILABLE, metadata={"virt_type": virt_type})
            return Hypervisor(virt_type, arch, offered)
        for preferred in ("kvm", "qemu"):
            if preferred in offered:
                return Hypervisor(preferred, arch, offered)
        if not offered:
            raise errors.FailedPrecondition(f"libvirt offers no hvm guests for {arch}",
                                            reason=VIRT_TYPE_UNAVAILABLE)
        return Hypervisor(offered[0], arch, offered)

    def xml(self, name: str, *, inactive: bool = False) -> str:
        """The domain's XML: live, or its persistent definition."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with self._connection.calling(f"read domain {name}") as conn:
            return str(conn.lookupByName(name).XMLDesc(flags))

    def define(self, xml: str) -> None:
        """Define (or redefine) a persistent domain from its XML."""
        with self._connection.calling("define a domain") as conn:
            conn.defineXML(xml)

    def start(self, name: str) -> None:
        """Start the defined domain; a disk file it cannot open is FailedPrecondition."""
        with self._connection.calling(f"start domain {name}") as conn:
            try:
                conn.lookupByName(name).create()
            except libvirt.libvirtError as exc:
                # A system error is transient when the daemon's socket fails, not when a
                # file the guest needs is missing or unreadable: retrying cannot help.
                if (exc.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
                        and exc.get_error_domain() in _FILE_ERROR_DOMAINS):
                    raise errors.FailedPrecondition(
                        f"libvirt at {self._connection.uri} cannot start domain {name}: {exc}",
                        reason="nubis.agent.libvirt_refused",
                        metadata={"libvirt_uri": self._connection.uri,
                                  "libvirt_code": str(exc.get_error_code())}) from exc
                raise

    def shutdown(self, name: str) -> None:
        """Ask the guest to shut down (ACPI power button)."""
        with self._connection.calling(f"shut down domain {name}") as conn:
            conn.lookupByName(name).shutdown()

    def destroy(self, name: str) -> None:
        """End the guest at once (power cut); a domain not running is left as it is."""
        with self._connection.calling(f"destroy domain {name}") as conn:
            domain = conn.lookupByName(name)
            if domain.isActive():
                domain.destroy()

    def undefine(self, name: str) -> None:
        """Remove the persistent definition, with its nvram and managed-save image if any."""
        with self._connection.calling(f"undefine domain {name}") as conn:
            domain = conn.lookupByName(name)
            if not domain.isPersistent():
                return
            try:
                domain.undefineFlags(_UNDEFINE_FLAGS)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, *_UNSUPPORTED):
                    raise
                domain.undefine()

    def wait_for(self, name: str, states: frozenset[str], timeout: float) -> DomainState | None:
        """Poll until the domain is in one of `states` (returned) or `timeout` passes (None);
        a domain gone meanwhile counts as shut off."""
        give_up = time.monotonic() + timeout
        while True:
            found = self.find(name)
            if found is None:
                return DomainState(name, "", "shutoff") if "shutoff" in states else None
            if found.state in states:
                return found
            if time.monotonic() >= give_up:
                return None
            time.sleep(min(_POLL, max(give_up - time.monotonic(), 0.0)))

    def attach(self, name: str, device: str, *, live: bool, config: bool) -> None:
        """Plug `device` into the running domain (`live`) and its definition (`config`)."""
        self._plug(name, device, live=live, config=config, attach=True)

    def detach(self, name: str, device: str, *, live: bool, config: bool) -> None:
        """Unplug `device` (a disk by target, a NIC by MAC) from the running domain and its
        definition."""
        self._plug(name, device, live=live, config=config, attach=False)

    def _plug(self, name: str, device: str, *, live: bool, config: bool, attach: bool) -> None:
        flags = ((libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
                 | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))
        if not flags:
            return
        verb = "attach a device to" if attach else "detach a device from"
        with self._connection.calling(f"{verb} domain {name}") as conn:
            domain = conn.lookupByName(name)
            try:
                if attach:
                    domain.attachDeviceFlags(device, flags)
                else:
                    domain.detachDeviceFlags(device, flags)
                return
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in _UNSUPPORTED:
                    raise
            if not config:
                return
            # No hot-plug in this driver (the test driver): the definition changes.
            current = str(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            changed = (domain_xml.with_device(current, device) if attach
                       else domain_xml.without_device(current, device))
            conn.defineXML(changed)

    def migrate(self, name: str, destination_uri: str, destination_xml: str, *,
                block: bool) -> None:
        """Live-migrate the domain to the libvirt at `destination_uri` (peer to peer), defined
        there from `destination_xml` and undefined here."""
        if self.is_test:
            raise errors.FailedPrecondition(
                "libvirt's test driver keeps its domains in the agent's memory and has no "
                "migration; live migration needs two nodes on qemu",
                reason=MIGRATION_UNSUPPORTED, metadata={"domain": name})
        flags = _MIGRATE_FLAGS | (libvirt.VIR_MIGRATE_NON_SHARED_DISK if block else 0)
        params = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: destination_xml,
                  libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: destination_xml}
        with self._connection.calling(f"migrate domain {name} to {destination_uri}") as conn:
            try:
                conn.lookupByName(name).migrateToURI3(destination_uri, params, flags)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _UNSUPPORTED:
                    raise errors.FailedPrecondition(
                        f"libvirt cannot live-migrate domain {name}: {exc}",
                        reason=MIGRATION_UNSUPPORTED, metadata={"domain": name}) from exc
                raise


def remote_status(uri: str, name: str) -> DomainState | None:
    """The domain `name` on another node's libvirt, or None (a migration already done)."""
    remote = Connection(uri)
    try:
        return _missing_is_none(lambda: _remote_lookup(remote, name))
    finally:
        remote.close()


def _remote_lookup(remote: Connection, name: str) -> DomainState:
    with remote.calling(f"look up domain {name}") as conn:
        return _state(conn.lookupByName(name))


def _missing_is_none(lookup: Callable[[], T]) -> T | None:
    try:
        return lookup()
    except errors.NotFound:
        return None


def _state(domain: libvirt.virDomain) -> DomainState:
    return DomainState(str(domain.name()), str(domain.UUIDString()),
                       _STATES.get(domain.state()[0], "unknown"), _instance_id(domain),
                       bool(domain.isPersistent()))


def _instance_id(domain: libvirt.virDomain) -> str:
    try:
        element = domain.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, domain_xml.NAMESPACE, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return ""
        raise
    found = domain_xml.parse_metadata(str(element))
    return "" if found is None else found.instance_id


def _hvm_offer(capabilities: str) -> tuple[str, tuple[str, ...]]:
    """The host's architecture and the domain types libvirt offers hvm guests of it (the
    first hvm architecture if none matches the host's)."""
    root = ElementTree.fromstring(capabilities)
    host_arch = root.findtext("host/cpu/arch", "")
    offers: dict[str, tuple[str, ...]] = {}
    for guest in root.iterfind("guest"):
        if guest.findtext("os_type") != "hvm":
            continue
        arch = guest.find("arch")
        if arch is None:
            continue
        types = tuple(d.get("type", "") for d in arch.iterfind("domain") if d.get("type"))
        offers.setdefault(arch.get("name", ""), types)
    if host_arch in offers:
        return host_arch, offers[host_arch]
    if offers:
        first = next(iter(offers))
        return first, offers[first]
    return host_arch, ()
