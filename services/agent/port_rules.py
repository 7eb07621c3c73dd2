"""What a port's filter is made of, whichever way the node enforces it.

The agent's firewall tasks turn a request into a `PortFilterSpec`: the port's
MAC and addresses, the pairs it may also send from, whether port security is
on, and every rule of its security groups; a rule whose peer is a remote group
is resolved on the node, from the group's members as the node holds them
(`GroupMembers`). The nftables chains of `dataplane.port_nft` (the default)
match such a rule's peer against the group's named set, which the node fills
from the member list; the libvirt nwfilters of `driver.nwfilter` are built
from the rules resolved into one rule per member network (`resolved`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOL_NAMES = {
    "tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "sctp": "sctp", "132": "sctp",
    "udplite": "udplite", "136": "udplite", "esp": "esp", "50": "esp", "ah": "ah", "51": "ah",
    "icmp": "icmp", "1": "icmp", "icmpv6": "icmp", "ipv6-icmp": "icmp", "58": "icmp",
    "igmp": "igmp", "2": "igmp", "": "", "any": "",
}
"""Protocols a rule may name (names and numbers) → nubis's name ("" = any, icmp covers v6)."""
PORTED = frozenset({"tcp", "udp", "sctp"})
"""Protocols whose rules take a destination port range."""
ND_TYPES = (133, 134, 135, 136)
"""ICMPv6 router solicitation/advertisement, neighbour solicitation/advertisement."""


@dataclass(frozen=True)
class Rule:
    """One security group rule; its peer a network, or a remote group still to resolve."""

    direction: str
    """"ingress" (to the port) or "egress" (from it)."""
    family: int
    """4 or 6."""
    protocol: str = ""
    """A key of PROTOCOL_NAMES' values: "tcp", "udp", "icmp", ... ("" = any)."""
    port_min: int = 0
    """First destination port (0 = all), or the ICMP type (-1 = any)."""
    port_max: int = 0
    """Last destination port (0 = port_min), or the ICMP code (-1 = any)."""
    remote: IPNetwork | None = None
    """Peer network (None = anywhere, unless `remote_group` is set)."""
    rule_id: str = ""
    remote_group: str = ""
    """Peer security group: the rule stands for one rule per member network of the group
    the node holds (an nftables set, or `resolved` for nwfilters)."""


@dataclass(frozen=True)
class GroupMembers:
    """A remote group's members as one listing of the ports saw them."""

    group_id: str
    networks: tuple[IPNetwork, ...]
    revision: int = 0


@dataclass(frozen=True)
class AddressPair:
    """A source (MAC, network) the port may send from."""

    mac: str
    network: IPNetwork


@dataclass(frozen=True)
class PortFilterSpec:
    """Everything a port's filter is made of."""

    port_id: str
    mac: str
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    allowed_pairs: tuple[AddressPair, ...] = ()
    port_security: bool = True
    rules: tuple[Rule, ...] = ()
    group_ids: tuple[str, ...] = ()

    def remote_groups(self) -> set[str]:
        """The groups its rules name as their remote."""
        return {rule.remote_group for rule in self.rules if rule.remote_group}

    def remote_sets(self) -> set[tuple[str, int]]:
        """The (group, family) pairs its rules name as their remote."""
        return {(rule.remote_group, rule.family) for rule in self.rules if rule.remote_group}

    def resolved(self, members: dict[str, GroupMembers]) -> PortFilterSpec:
        """The spec with each remote-group rule replaced by one rule per member network of
        its family (none for a group without members, or not known): what nwfilters are
        made of.
        """
        if not any(rule.remote_group for rule in self.rules):
            return self
        rules: list[Rule] = []
        for rule in self.rules:
            if not rule.remote_group:
                rules.append(rule)
                continue
            found = members.get(rule.remote_group)
            rules.extend(dataclasses.replace(rule, remote=network, remote_group="")
                         for network in (found.networks if found is not None else ())
                         if network.version == rule.family)
        return dataclasses.replace(self, rules=tuple(rules))

    def sources(self) -> list[AddressPair]:
        """Every (MAC, network) the port may send from: its own addresses, then the pairs."""
        own = [AddressPair(self.mac, ipaddress.ip_network(a)) for a in self.addresses]
        return own + list(self.allowed_pairs)


@dataclass(frozen=True)
class RealizedFilter:
    """A port's filter as the node holds it (or, on a test-driver node, records it)."""

    name: str
    names: tuple[str, ...]
    """Its chains (nftables) or nwfilters, sorted."""
    text: str
    """Its chains as `nft list` prints them, or its root nwfilter's XML."""
    recorded: bool
    changed: bool = False


def link_local(mac: str) -> ipaddress.IPv6Address:
    """fe80::/64 with the modified EUI-64 of `mac`, as the guest's kernel makes it."""
    octets = [int(part, 16) for part in mac.split(":")]
    eui = [octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]]
    return ipaddress.IPv6Address(bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, *eui]))
