"""Network's own checks on request fields: CIDRs, addresses, pools, MACs, rule ranges.

Ids, names, labels, masks and page tokens every service shares are in
``services.common.resources`` and ``services.common.pages``. Each check adds
what is wrong to a `ViolationCollector` under the request's field path, so a
request reports every bad field at once.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nubis.network.v1 import subnet_pb2

from services.common import errors

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Cidr = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MIN_MTU, MAX_MTU = 68, 9000
# Smallest subnets: an IPv4 /30 has two host addresses, an IPv6 /126 three.
_MAX_PREFIX = {4: 30, 6: 126}


@dataclass(frozen=True)
class Pool:
    """An inclusive range of addresses, as integers (the allocator's view)."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, value: int) -> bool:
        return self.first <= value <= self.last


def parse_cidr(violations: errors.ViolationCollector, field: str, text: str) -> Cidr | None:
    """The network `text` names ("10.0.0.0/24"); host bits set or a bad prefix is a violation."""
    if "/" not in text:
        violations.add(field, "must be a CIDR such as 10.0.0.0/24")
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        violations.add(field, f"not a network address in CIDR form: {exc}")
        return None


def parse_address(violations: errors.ViolationCollector, field: str, text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        violations.add(field, "not an IP address")
        return None


def check_subnet_size(violations: errors.ViolationCollector, field: str, cidr: Cidr) -> None:
    if cidr.prefixlen > _MAX_PREFIX[cidr.version]:
        violations.add(field, f"a /{cidr.prefixlen} leaves no room for hosts "
                              f"(at most /{_MAX_PREFIX[cidr.version]})")


def host_range(cidr: Cidr) -> Pool:
    """Addresses hosts may use: IPv4 leaves out network and broadcast, IPv6 the subnet-router."""
    first, last = int(cidr.network_address), int(cidr.broadcast_address)
    return Pool(first + 1, last - 1 if cidr.version == 4 else last)


def default_pools(cidr: Cidr, gateway: int | None) -> list[Pool]:
    """The whole host range less the gateway: one pool, or two around a gateway inside it."""
    hosts = host_range(cidr)
    if gateway is None or gateway not in hosts:
        return [hosts]
    pools = [Pool(hosts.first, gateway - 1), Pool(gateway + 1, hosts.last)]
    return [pool for pool in pools if pool.size > 0]


def parse_pools(
    violations: errors.ViolationCollector, field: str,
    pools: Sequence[subnet_pb2.AllocationPool], cidr: Cidr,
) -> list[Pool]:
    """The pools as ranges: each inside the subnet's hosts, start <= end, none overlapping."""
    hosts = host_range(cidr)
    parsed: list[tuple[int, Pool]] = []
    for index, pool in enumerate(pools):
        where = f"{field}[{index}]"
        start = parse_address(violations, f"{where}.start", pool.start)
        end = parse_address(violations, f"{where}.end", pool.end)
        if start is None or end is None:
            continue
        if start.version != cidr.version or end.version != cidr.version:
            violations.add(where, f"must be IPv{cidr.version} addresses")
            continue
        if int(start) > int(end):
            violations.add(where, "start must not be after end")
            continue
        if int(start) not in hosts or int(end) not in hosts:
            violations.add(where, f"must lie within the host addresses of {cidr}")
            continue
        parsed.append((index, Pool(int(start), int(end))))
    ordered = sorted(parsed, key=lambda item: item[1].first)
    for (_, before), (index, after) in itertools.pairwise(ordered):
        if after.first <= before.last:
            violations.add(f"{field}[{index}]", "overlaps another allocation pool")
    return [pool for _, pool in parsed]


def check_mtu(violations: errors.ViolationCollector, field: str, mtu: int) -> None:
    if mtu and not MIN_MTU <= mtu <= MAX_MTU:
        violations.add(field, f"must be {MIN_MTU}..{MAX_MTU} (0 = the default)")


def normal_mac(text: str) -> str:
    """A MAC in nubis's spelling: lower case, colon separated."""
    return text.strip().lower().replace("-", ":")


def check_mac(violations: errors.ViolationCollector, field: str, text: str) -> str:
    """The MAC in lower case; a malformed, multicast or all-zero one is a violation."""
    mac = normal_mac(text)
    if not _MAC.fullmatch(mac):
        violations.add(field, "must be a MAC address such as fa:16:3e:12:34:56")
        return mac
    if int(mac[:2], 16) & 1:
        violations.add(field, "must be a unicast MAC (lowest bit of the first octet clear)")
    elif mac == "00:00:00:00:00:00":
        violations.add(field, "must not be all zeros")
    return mac


def check_address_or_cidr(violations: errors.ViolationCollector, field: str, text: str) -> None:
    """An allowed address pair's ip_address: one address or a CIDR."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        violations.add(field, "must be an IP address or a CIDR")


def address(value: int, version: int) -> str:
    """The text of the address `value` of IP `version`."""
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))
