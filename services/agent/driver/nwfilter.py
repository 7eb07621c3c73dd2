"""Security groups as libvirt nwfilters: one root filter per port, with its anti-spoofing chains.

A port's filter is ``nubis-port-<port id>`` (chain ``root``). With port
security on it jumps to the port's own sub-chains, much as libvirt's
``clean-traffic`` does, with the addresses written in (a port's filter is its
own, so nothing needs libvirt's ``$IP`` learning):

- ``nubis-port-<id>-mac`` (chain ``mac``): frames may leave only from the
  port's MAC or an allowed pair's MAC;
- ``-ipv4`` / ``-ipv6`` (chains ``ipv4-ip`` / ``ipv6-ip``): packets may leave
  only from the port's addresses and allowed pairs (each with its MAC), plus a
  DHCP request from 0.0.0.0 and IPv6's link-local and DAD sources;
- ``-arp`` (chain ``arp-ip``): ARP may claim only those MAC/address pairs;

then accepts IPv4, IPv6 and ARP and drops every other kind of frame. At layer
3 it lets DHCP and IPv6 neighbour discovery through, refuses to let the port
answer DHCP, accepts what the security group rules allow (stateful: libvirt
matches replies of an accepted flow) and drops the rest, both ways. With port
security off the root filter is empty: everything passes.

On a libvirt without an nwfilter driver (``test:///default``) the filters
are kept in memory instead, so the same path runs and can be read back.
"""

from __future__ import annotations

import threading
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import libvirt

from services.agent.driver.connection import Connection
from services.agent.port_rules import (
    ND_TYPES,
    PORTED,
    AddressPair,
    IPNetwork,
    PortFilterSpec,
    RealizedFilter,
    Rule,
    link_local,
)
from services.common import errors

FILTER_PREFIX = "nubis-port-"
"""Every nwfilter nubis defines starts with this."""
SUB_CHAINS = ("mac", "ipv4", "ipv6", "arp")
"""Suffixes of a port's anti-spoofing filters."""

# libvirt chain (with its type prefix) and jump priority of each sub-chain:
# lower runs first, and the root's own accept rules sit between them.
_CHAINS = {"mac": ("mac", -800), "ipv4": ("ipv4-ip", -710), "ipv6": ("ipv6-ip", -610),
           "arp": ("arp-ip", -510)}
_RULE_PRIORITY = 500
_DROP_PRIORITY = 1000

# nwfilter element per (protocol, family); the ones with ports take port ranges.
_ELEMENTS = {
    ("tcp", 4): "tcp", ("udp", 4): "udp", ("sctp", 4): "sctp", ("udplite", 4): "udplite",
    ("esp", 4): "esp", ("ah", 4): "ah", ("icmp", 4): "icmp", ("igmp", 4): "igmp",
    ("", 4): "all",
    ("tcp", 6): "tcp-ipv6", ("udp", 6): "udp-ipv6", ("sctp", 6): "sctp-ipv6",
    ("udplite", 6): "udplite-ipv6", ("esp", 6): "esp-ipv6", ("ah", 6): "ah-ipv6",
    ("icmp", 6): "icmpv6", ("", 6): "all-ipv6",
}
def filter_name(port_id: str) -> str:
    """The root nwfilter of a port."""
    return f"{FILTER_PREFIX}{port_id}"


def filterref_xml(port_id: str) -> str:
    """The `<filterref>` a domain's interface carries for the port."""
    return ElementTree.tostring(ElementTree.Element("filterref", filter=filter_name(port_id)),
                                encoding="unicode")


def interface_xml(port_id: str, mac: str, bridge: str = "", mtu: int = 0,
                  target: str = "", filtered: bool = True) -> str:
    """A whole `<interface type='bridge'>` for the port, its filter referenced if `filtered`."""
    interface = ElementTree.Element("interface", type="bridge")
    ElementTree.SubElement(interface, "mac", address=mac)
    if bridge:
        ElementTree.SubElement(interface, "source", bridge=bridge)
    if target:
        ElementTree.SubElement(interface, "target", dev=target)
    ElementTree.SubElement(interface, "model", type="virtio")
    if mtu:
        ElementTree.SubElement(interface, "mtu", size=str(mtu))
    if filtered:
        ElementTree.SubElement(interface, "filterref", filter=filter_name(port_id))
    return ElementTree.tostring(interface, encoding="unicode")


def build(spec: PortFilterSpec) -> dict[str, str]:
    """Every filter of the port, name → XML (no uuid), sub-chains first, the root last."""
    root_name = filter_name(spec.port_id)
    if not spec.port_security:
        return {root_name: _xml(_filter(root_name, "root"))}
    sources = spec.sources()
    filters = {
        f"{root_name}-mac": _mac_chain(f"{root_name}-mac", {s.mac for s in sources} | {spec.mac}),
        f"{root_name}-ipv4": _ip_chain(f"{root_name}-ipv4", 4, sources, spec.mac),
        f"{root_name}-ipv6": _ip_chain(f"{root_name}-ipv6", 6, sources, spec.mac),
        f"{root_name}-arp": _arp_chain(f"{root_name}-arp", sources),
    }
    built = {name: _xml(element) for name, element in filters.items()}
    built[root_name] = _xml(_root(root_name, spec))
    return built


def _filter(name: str, chain: str, priority: int | None = None) -> ElementTree.Element:
    attributes = {"name": name, "chain": chain}
    if priority is not None:
        attributes["priority"] = str(priority)
    return ElementTree.Element("filter", attributes)


def _rule(parent: ElementTree.Element, action: str, direction: str, priority: int,
          element: str | None = None, **attributes: str) -> None:
    rule = ElementTree.SubElement(parent, "rule", action=action, direction=direction,
                                  priority=str(priority))
    if element is not None:
        ElementTree.SubElement(rule, element, attributes)


def _sub_chain(name: str, suffix: str) -> ElementTree.Element:
    chain, priority = _CHAINS[suffix]
    return _filter(name, chain, priority)


def _mac_chain(name: str, macs: Iterable[str]) -> ElementTree.Element:
    chain = _sub_chain(name, "mac")
    for mac in sorted(macs):
        _rule(chain, "return", "out", _RULE_PRIORITY, "mac", srcmacaddr=mac)
    _rule(chain, "drop", "out", _DROP_PRIORITY)
    return chain


def _net(network: IPNetwork) -> dict[str, str]:
    return {"srcipaddr": str(network.network_address), "srcipmask": str(network.prefixlen)}


def _ip_chain(name: str, family: int, sources: list[AddressPair],
              mac: str) -> ElementTree.Element:
    chain = _sub_chain(name, "ipv4" if family == 4 else "ipv6")
    protocol = "ip" if family == 4 else "ipv6"
    if family == 4:  # a DHCP client asks before it has an address
        _rule(chain, "return", "out", 100, "ip", srcipaddr="0.0.0.0", protocol="udp",
              srcportstart="68", dstportstart="67")
    else:  # duplicate address detection, and the link-local address made from the MAC
        _rule(chain, "return", "out", 100, "ipv6", srcipaddr="::", srcipmask="128")
        _rule(chain, "return", "out", 100, "ipv6", srcmacaddr=mac,
              srcipaddr=str(link_local(mac)), srcipmask="128")
    for source in sources:
        if source.network.version == family:
            _rule(chain, "return", "out", _RULE_PRIORITY, protocol, srcmacaddr=source.mac,
                  **_net(source.network))
    _rule(chain, "drop", "out", _DROP_PRIORITY)
    return chain


def _arp_chain(name: str, sources: list[AddressPair]) -> ElementTree.Element:
    chain = _sub_chain(name, "arp")
    for source in sources:
        if source.network.version == 4:
            _rule(chain, "return", "out", _RULE_PRIORITY, "arp", arpsrcmacaddr=source.mac,
                  arpsrcipaddr=str(source.network.network_address),
                  arpsrcipmask=str(source.network.prefixlen))
    _rule(chain, "drop", "out", _DROP_PRIORITY)
    return chain


def _root(name: str, spec: PortFilterSpec) -> ElementTree.Element:
    root = _filter(name, "root")
    for suffix in SUB_CHAINS:
        ElementTree.SubElement(root, "filterref", filter=f"{name}-{suffix}")
    # Layer 2 (ebtables): what the sub-chains returned, and ARP, pass; nothing else does.
    for direction in ("out", "in"):
        _rule(root, "accept", direction, -650, "mac", protocolid="ipv4")
        _rule(root, "accept", direction, -590, "mac", protocolid="ipv6")
    _rule(root, "accept", "inout", -500, "mac", protocolid="arp")
    _rule(root, "drop", "inout", _DROP_PRIORITY, "mac")
    # Layer 3 (iptables): DHCP as a client only, neighbour discovery, the rules, then drop.
    _rule(root, "drop", "out", 90, "udp", srcportstart="67", dstportstart="68")
    _rule(root, "accept", "out", 100, "udp", srcportstart="68", dstportstart="67")
    _rule(root, "accept", "in", 100, "udp", srcportstart="67", dstportstart="68")
    for nd_type in ND_TYPES:
        _rule(root, "accept", "inout", 100, "icmpv6", type=str(nd_type))
    for rule in spec.rules:
        _security_rule(root, rule)
    _rule(root, "drop", "inout", _DROP_PRIORITY, "all")
    _rule(root, "drop", "inout", _DROP_PRIORITY, "all-ipv6")
    return root


def _security_rule(root: ElementTree.Element, rule: Rule) -> None:
    attributes: dict[str, str] = {}
    if rule.remote is not None:
        side = "src" if rule.direction == "ingress" else "dst"
        attributes[f"{side}ipaddr"] = str(rule.remote.network_address)
        attributes[f"{side}ipmask"] = str(rule.remote.prefixlen)
    if rule.protocol in PORTED and rule.port_min > 0:
        attributes["dstportstart"] = str(rule.port_min)
        attributes["dstportend"] = str(max(rule.port_max, rule.port_min))
    elif rule.protocol == "icmp" and rule.port_min >= 0 \
            and (rule.port_min, rule.port_max) != (0, 0):
        attributes["type"] = str(rule.port_min)
        if rule.port_max >= 0:
            attributes["code"] = str(rule.port_max)
    direction = "in" if rule.direction == "ingress" else "out"
    _rule(root, "accept", direction, _RULE_PRIORITY, _ELEMENTS[(rule.protocol, rule.family)],
          **attributes)


def _xml(element: ElementTree.Element) -> str:
    ElementTree.indent(element)
    return ElementTree.tostring(element, encoding="unicode")


def canonical(xml: str) -> str:
    """A filter's XML with its uuid, comments and layout dropped, attributes in order:
    what two definitions share when they filter the same way."""
    element = ElementTree.fromstring(xml)
    for found in element.findall("uuid"):
        element.remove(found)
    return "".join(_canonical_parts(element))


def _canonical_parts(element: ElementTree.Element) -> Iterator[str]:
    attributes = " ".join(f"{key}={element.attrib[key]!r}" for key in sorted(element.attrib))
    yield f"<{element.tag} {attributes}>"
    for child in element:
        if isinstance(child.tag, str):
            yield from _canonical_parts(child)
    yield f"</{element.tag}>"


def _with_uuid(xml: str, filter_uuid: str) -> str:
    """The definition carrying `filter_uuid` (libvirt redefines a filter only under its uuid)."""
    element = ElementTree.fromstring(xml)
    for found in element.findall("uuid"):
        element.remove(found)
    uuid_element = ElementTree.Element("uuid")
    uuid_element.text = filter_uuid
    element.insert(0, uuid_element)
    return ElementTree.tostring(element, encoding="unicode")


@dataclass
class _Memory:
    """Filters kept for a libvirt that has no nwfilter driver: name → XML as defined."""

    filters: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Filters:
    """The node's nwfilters through its connection (or in memory where libvirt has none)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._memory = _Memory()
        self._supported: bool | None = None

    def recorded(self) -> bool:
        """True if this libvirt has no nwfilter driver, so filters are only kept in memory."""
        if self._supported is None:
            with self._connection.calling("probe the nwfilter driver") as conn:
                try:
                    conn.listNWFilters()
                    self._supported = True
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
                    self._supported = False
        return not self._supported

    def ensure(self, spec: PortFilterSpec) -> RealizedFilter:
        """Define the port's filters as `spec` says; redefine those that differ, undefine
        sub-chains it no longer has. libvirt re-applies a changed filter to running guests."""
        wanted = build(spec)
        changed = False
        for name, xml in wanted.items():
            changed |= self._define(name, xml)
        for name in self._port_names(spec.port_id):
            if name not in wanted:
                changed |= self._undefine(name)
        found = self.get(spec.port_id)
        return RealizedFilter(found.name, found.names, found.text, found.recorded, changed)

    def remove(self, port_id: str) -> bool:
        """Undefine every filter of the port, the root first; True if there was one."""
        root = filter_name(port_id)
        names = sorted(self._port_names(port_id), key=lambda name: name != root)
        return any([self._undefine(name) for name in names])

    def get(self, port_id: str) -> RealizedFilter:
        """The port's filters now; NotFound if it has no root filter."""
        root = filter_name(port_id)
        xml = self._read(root)
        if xml is None:
            raise errors.NotFound(f"port {port_id} has no nwfilter on this node",
                                  reason="nubis.agent.filter_not_found",
                                  metadata={"port_id": port_id})
        return RealizedFilter(root, tuple(sorted(self._port_names(port_id))), xml,
                              self.recorded())

    def names(self) -> list[str]:
        """Every nubis nwfilter of the node, sorted."""
        if self.recorded():
            with self._memory.lock:
                return sorted(self._memory.filters)
        with self._connection.calling("list nwfilters") as conn:
            return sorted(n for n in conn.listNWFilters() if n.startswith(FILTER_PREFIX))

    def _port_names(self, port_id: str) -> list[str]:
        root = filter_name(port_id)
        return [n for n in self.names() if n == root or n.startswith(f"{root}-")]

    def _read(self, name: str) -> str | None:
        if self.recorded():
            with self._memory.lock:
                return self._memory.filters.get(name)
        with self._connection.calling(f"read nwfilter {name}") as conn:
            try:
                return str(conn.nwfilterLookupByName(name).XMLDesc(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER:
                    return None
                raise

    def _define(self, name: str, xml: str) -> bool:
        current = self._read(name)
        if current is not None and canonical(current) == canonical(xml):
            return False
        current_uuid = None if current is None else ElementTree.fromstring(current).findtext("uuid")
        definition = _with_uuid(xml, current_uuid or str(uuid.uuid4()))
        if self.recorded():
            ElementTree.fromstring(definition)  # at least well-formed, as libvirt would check
            with self._memory.lock:
                self._memory.filters[name] = definition
            return True
        with self._connection.calling(f"define nwfilter {name}") as conn:
            conn.nwfilterDefineXML(definition)
        return True

    def _undefine(self, name: str) -> bool:
        if self.recorded():
            with self._memory.lock:
                return self._memory.filters.pop(name, None) is not None
        with self._connection.calling(f"undefine nwfilter {name}") as conn:
            try:
                conn.nwfilterLookupByName(name).undefine()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_NWFILTER:
                    return False
                raise
        return True
