"""Security groups in nftables: each port's chains, in the namespace of the network's bridge.

A port's traffic is filtered where it crosses the bridge, by the name of its
tap (`network_devices.tap`), so the chains can be loaded before the guest's
tap exists and hold from its first frame. Table ``bridge nubis-ports`` has
two verdict maps keyed by interface name, ``egress`` (frames from the port)
and ``ingress`` (frames to it), which the table's ``forward`` and ``input``
base chains look up; each port has its own chains, as libvirt's
``clean-traffic`` nwfilter has:

- ``port-<id>-out``: the frame's MAC must be the port's or an allowed pair's;
  ARP goes through ``-arp`` (only the port's MAC/address pairs may be
  claimed), IPv4 and IPv6 through ``-ip4`` / ``-ip6`` (only the port's
  addresses and pairs, each with its MAC, plus a DHCP request from 0.0.0.0 and
  IPv6's unspecified and link-local sources); any other kind of frame is
  dropped. Then the port may not answer DHCP, may ask it, may do neighbour
  discovery, may send replies of flows already accepted, and may send what
  the egress rules allow; nothing else. Allowed frames *return*, so the
  ingress chain of a receiving port on the same bridge still runs.
- ``port-<id>-in``: ARP, DHCP answers, neighbour discovery, replies of
  accepted flows and what the ingress rules allow reach the port; nothing else.

Stateful matching needs conntrack, which the bridge family cannot use on
kernels without ``nf_conntrack_bridge``; so the node's bridged IP traffic is
passed to the inet hooks (``net.bridge.bridge-nf-call-iptables`` and
``-ip6tables`` in that namespace), where table ``inet nubis-ports`` marks the
packets of established and related flows in prerouting (bit
`ESTABLISHED_MARK`) and clears the bit again in forward and input, after the
bridge's chains (priority -200) have read it.

A rule whose peer is a remote group matches the group's named set,
``rg-<group id>-4`` (or ``-6``) in the bridge table, which holds the group's
member networks as the node was last given them: a member coming or going
rewrites the set, once for the node, and no port's chains. A port's
transaction makes the sets its chains name, filled; a set no filter names any
more goes.

With port security off the port's chains are empty: everything passes.
Every change of a port is one nft transaction: its old chains and map entries
go and the new ones come at once. The out chain's comment carries a digest of
what was loaded, so a repeat of the same filter reads one chain and writes
nothing. Nodes on libvirt's test driver keep the same chains in memory
(`RecordingPortFilters`).
"""

from __future__ import annotations

import abc
import collections
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping

import structlog

from services.agent.dataplane import commands
from services.agent.port_rules import (
    ND_TYPES,
    PORTED,
    GroupMembers,
    IPNetwork,
    PortFilterSpec,
    RealizedFilter,
    Rule,
    link_local,
)
from services.common import errors, network_devices

log = structlog.get_logger(__name__)

TABLE = "nubis-ports"
"""The bridge table (and the inet table) that hold every port's filter."""
ESTABLISHED_MARK = 0x00100000
"""The packet-mark bit that says "this packet belongs to an accepted flow"."""
MAX_ACTIONS = 10_000
"""Transactions the recording keeps; the oldest go first."""
SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
"""What makes the node's bridged IP traffic visible to conntrack."""

_BRIDGE = f"bridge {TABLE}"
_INET = f"inet {TABLE}"
_PORT_CHAIN = re.compile(r"^\tchain (port-([0-9a-f-]{36})-(?:out|in|arp|ip4|ip6)) \{$")
_COMMENT = re.compile(r'comment "nubis ([0-9a-f]+)"')
_SET = re.compile(r"^\tset (rg-[0-9a-f-]{36}-[46]) \{$")
_SET_REF = re.compile(r"@(rg-[0-9a-f-]{36}-[46])\b")
_SUFFIXES = ("arp", "ip4", "ip6", "out", "in")

BASE = (
    f"add table {_BRIDGE}",
    f"add map {_BRIDGE} egress {{ type ifname : verdict ; }}",
    f"add map {_BRIDGE} ingress {{ type ifname : verdict ; }}",
    f"add chain {_BRIDGE} forward {{ type filter hook forward priority -200 ; policy accept ; }}",
    f"flush chain {_BRIDGE} forward",
    f"add rule {_BRIDGE} forward iifname vmap @egress",
    f"add rule {_BRIDGE} forward oifname vmap @ingress",
    f"add chain {_BRIDGE} input {{ type filter hook input priority -200 ; policy accept ; }}",
    f"flush chain {_BRIDGE} input",
    f"add rule {_BRIDGE} input iifname vmap @egress",
    f"add table {_INET}",
    f"add chain {_INET} prerouting {{ type filter hook prerouting priority -150 ; "
    "policy accept ; }",
    f"flush chain {_INET} prerouting",
    f"add rule {_INET} prerouting ct state established,related "
    f"meta mark set meta mark | {ESTABLISHED_MARK:#010x}",
    *(line for hook in ("forward", "input") for line in (
        f"add chain {_INET} {hook} {{ type filter hook {hook} priority -150 ; policy accept ; }}",
        f"flush chain {_INET} {hook}",
        f"add rule {_INET} {hook} meta mark set meta mark & {~ESTABLISHED_MARK & 0xFFFFFFFF:#010x}",
    )),
)
"""The tables, maps and base chains every port's filter hangs from (each line converges)."""


def chain(port_id: str, suffix: str) -> str:
    """Name of one of the port's chains (`suffix`: out, in, arp, ip4, ip6)."""
    return f"port-{port_id}-{suffix}"


def group_set(group_id: str, family: int) -> str:
    """Name of the set of a remote group's member networks of one family (4 or 6)."""
    return f"rg-{group_id}-{family}"


GroupSets = Mapping[str, tuple[IPNetwork, ...]]
"""Sets by name (`group_set`) → their member networks."""


def sets_of(spec: PortFilterSpec, members: Mapping[str, GroupMembers],
            groups: Iterable[str] | None = None) -> dict[str, tuple[IPNetwork, ...]]:
    """The sets the port's chains name (only those of `groups`, if given), each with its
    group's member networks of its family (none for a group not known)."""
    only = None if groups is None else set(groups)
    wanted: dict[str, tuple[IPNetwork, ...]] = {}
    for group_id, family in spec.remote_sets():
        if only is not None and group_id not in only:
            continue
        found = members.get(group_id)
        wanted[group_set(group_id, family)] = tuple(
            network for network in (found.networks if found is not None else ())
            if network.version == family)
    return wanted


def filter_name(port_id: str) -> str:
    """How the port's filter is named in answers: its table and its chains' common stem."""
    return f"{_BRIDGE} port-{port_id}"


# --- what a port's chains are ----------------------------------------------------------

def chains(spec: PortFilterSpec) -> dict[str, list[str]]:
    """Every chain of the port, name → its rules in order, the ones jumped to first."""
    out, inbound = chain(spec.port_id, "out"), chain(spec.port_id, "in")
    if not spec.port_security:
        return {out: [], inbound: []}
    sources = spec.sources()
    macs = sorted({source.mac for source in sources} | {spec.mac})
    arp = [f"arp saddr ether {s.mac} arp saddr ip {s.network} return"
           for s in sources if s.network.version == 4]
    ip4 = ["ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
           *(f"ether saddr {s.mac} ip saddr {s.network} return"
             for s in sources if s.network.version == 4)]
    ip6 = ["ip6 saddr :: return", f"ether saddr {spec.mac} ip6 saddr {link_local(spec.mac)} return",
           *(f"ether saddr {s.mac} ip6 saddr {s.network} return"
             for s in sources if s.network.version == 6)]
    nd = f"icmpv6 type {{ {', '.join(str(t) for t in ND_TYPES)} }}"
    established = f"meta mark & {ESTABLISHED_MARK:#010x} == {ESTABLISHED_MARK:#010x}"
    rules = {direction: [_match(rule) for rule in spec.rules if rule.direction == direction]
             for direction in ("egress", "ingress")}
    return {
        chain(spec.port_id, "arp"): [*arp, "drop"],
        chain(spec.port_id, "ip4"): [*ip4, "drop"],
        chain(spec.port_id, "ip6"): [*ip6, "drop"],
        out: [
            f"ether saddr != {{ {', '.join(macs)} }} drop",
            f"ether type arp jump {chain(spec.port_id, 'arp')}",
            "ether type arp return",
            f"ether type ip jump {chain(spec.port_id, 'ip4')}",
            f"ether type ip6 jump {chain(spec.port_id, 'ip6')}",
            "ether type != { ip, ip6 } drop",
            "udp sport 67 udp dport 68 drop",
            "udp sport 68 udp dport 67 return",
            f"{nd} return",
            f"{established} return",
            *(f"{match} return" for match in rules["egress"]),
            "drop",
        ],
        inbound: [
            "ether type arp accept",
            "ether type != { ip, ip6 } drop",
            "udp sport 67 udp dport 68 accept",
            f"{nd} accept",
            f"{established} accept",
            *(f"{match} accept" for match in rules["ingress"]),
            "drop",
        ],
    }


def _match(rule: Rule) -> str:
    """The nft match of one security group rule (its verdict is the caller's)."""
    ip = "ip" if rule.family == 4 else "ip6"
    parts = [f"ether type {ip}"]
    peer = f"{ip} {'saddr' if rule.direction == 'ingress' else 'daddr'}"
    if rule.remote_group:
        parts.append(f"{peer} @{group_set(rule.remote_group, rule.family)}")
    elif rule.remote is not None:
        parts.append(f"{peer} {rule.remote}")
    if rule.protocol == "icmp":
        icmp = "icmp" if rule.family == 4 else "icmpv6"
        parts.append(f"meta l4proto {icmp}")
        # (0, 0) is "any", as the API has always read it; -1 is "any" for either.
        if rule.port_min >= 0 and (rule.port_min, rule.port_max) != (0, 0):
            parts.append(f"{icmp} type {rule.port_min}")
            if rule.port_max >= 0:
                parts.append(f"{icmp} code {rule.port_max}")
    elif rule.protocol:
        parts.append(f"meta l4proto {rule.protocol}")
        if rule.protocol in PORTED and rule.port_min > 0:
            high = max(rule.port_max, rule.port_min)
            ports = str(rule.port_min) if high == rule.port_min else f"{rule.port_min}-{high}"
            parts.append(f"{rule.protocol} dport {ports}")
    return " ".join(parts)


def digest(port_id: str, kept: dict[str, list[str]]) -> str:
    """What identifies the port's filter: its tap and every rule of its chains (`chains`)."""
    text = "\n".join([network_devices.tap(port_id),
                      *(f"{name}: {rule}" for name, rules in kept.items() for rule in rules)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clear(port_id: str) -> list[str]:
    """Lines that remove the port's map entries and chains, whether or not they exist."""
    tap = network_devices.tap(port_id)
    names = [chain(port_id, suffix) for suffix in _SUFFIXES]
    return [
        *(f"add chain {_BRIDGE} {name}" for name in names),
        f'add element {_BRIDGE} egress {{ "{tap}" : jump {chain(port_id, "out")} }}',
        f'delete element {_BRIDGE} egress {{ "{tap}" }}',
        f'add element {_BRIDGE} ingress {{ "{tap}" : jump {chain(port_id, "in")} }}',
        f'delete element {_BRIDGE} ingress {{ "{tap}" }}',
        *(f"flush chain {_BRIDGE} {name}" for name in names),
        *(f"delete chain {_BRIDGE} {name}" for name in names),
    ]


def _element(network: IPNetwork) -> str:
    """A set element as nft prints it: a host's address bare, a network as its prefix."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _set_type(name: str) -> str:
    """The element type of a group's set (`group_set`), by its family."""
    return "ipv6_addr" if name.endswith("-6") else "ipv4_addr"


def _set_lines(sets: GroupSets) -> list[str]:
    """Lines that make each set exactly its networks (made first where missing)."""
    lines: list[str] = []
    for name, networks in sorted(sets.items()):
        lines.append(f"add set {_BRIDGE} {name} {{ type {_set_type(name)} ; flags interval ; }}")
        lines.append(f"flush set {_BRIDGE} {name}")
        if networks:
            lines.append(f"add element {_BRIDGE} {name} "
                         f"{{ {', '.join(_element(n) for n in networks)} }}")
    return lines


def ensure_script(spec: PortFilterSpec, kept: dict[str, list[str]] | None = None,
                  sets: GroupSets | None = None) -> str:
    """One nft transaction that makes the port's filter exactly `spec`'s (its `chains`,
    given as `kept` where the caller has them) and the sets its chains name (`sets`)."""
    kept = chains(spec) if kept is None else kept
    wanted = digest(spec.port_id, kept)
    tap = network_devices.tap(spec.port_id)
    lines = [*BASE, *_set_lines(sets or {}), *_clear(spec.port_id)]
    out = chain(spec.port_id, "out")
    for name, rules in kept.items():
        comment = f' {{ comment "nubis {wanted}" ; }}' if name == out else ""
        lines.append(f"add chain {_BRIDGE} {name}{comment}")
        lines.extend(f"add rule {_BRIDGE} {name} {rule}" for rule in rules)
    lines.append(f'add element {_BRIDGE} egress {{ "{tap}" : jump {out} }}')
    lines.append(f'add element {_BRIDGE} ingress {{ "{tap}" : jump {chain(spec.port_id, "in")} }}')
    return "".join(f"{line}\n" for line in lines)


def sets_script(sets: GroupSets) -> str:
    """One nft transaction that makes each of `sets` exactly its networks."""
    return "".join(f"{line}\n" for line in [BASE[0], *_set_lines(sets)])


def named_sets(kept: dict[str, list[str]]) -> set[str]:
    """The sets a port's chains name."""
    return {name for rules in kept.values() for rule in rules for name in _SET_REF.findall(rule)}


def remove_script(port_id: str) -> str:
    """One nft transaction that removes the port's filter (nothing else)."""
    lines = [*BASE[:3], *_clear(port_id)]
    return "".join(f"{line}\n" for line in lines)


def _blocks(table: str, header: re.Pattern[str],
            wanted: Callable[[re.Match[str]], bool]) -> dict[str, str]:
    """The blocks of a table listing whose first line matches `header` and is `wanted`:
    name (the match's first group) → the block's text as nft printed it."""
    blocks: dict[str, str] = {}
    name: str | None = None
    current: list[str] = []
    for line in table.splitlines():
        match = header.match(line)
        if match and wanted(match):
            name, current = match.group(1), [line]
            blocks[name] = ""
            continue
        if name is not None:
            current.append(line)
            if line == "\t}":
                blocks[name] = "\n".join(current) + "\n"
                name = None
    return blocks


def _not_found(port_id: str) -> errors.NotFound:
    return errors.NotFound(f"port {port_id} has no filter on this node",
                           reason="nubis.agent.filter_not_found", metadata={"port_id": port_id})


# --- the node's filters ------------------------------------------------------------------

class PortFilters(abc.ABC):
    """The ports' filters of one node; every method converges, none assumes state."""

    recorded: bool
    """True where nothing is loaded into a kernel (the test driver's nodes)."""

    @abc.abstractmethod
    def ensure(self, spec: PortFilterSpec, sets: GroupSets | None = None) -> RealizedFilter:
        """Make the port's filter exactly `spec`'s, and the sets its chains name exactly
        `sets`; `changed` if the chains were loaded."""

    @abc.abstractmethod
    def ensure_sets(self, sets: GroupSets) -> None:
        """Make each of `sets` exactly its networks, in one transaction."""

    @abc.abstractmethod
    def drop_sets(self, names: Iterable[str]) -> None:
        """Remove the sets no filter names any more (one still named stays)."""

    @abc.abstractmethod
    def remove(self, port_id: str) -> bool:
        """Remove the port's chains and map entries; False if it had none."""

    @abc.abstractmethod
    def get(self, port_id: str) -> RealizedFilter:
        """The port's filter now; NotFound if it has none."""

    @abc.abstractmethod
    def port_ids(self) -> list[str]:
        """Ids of every port with a filter on this node, sorted."""


class KernelPortFilters(PortFilters):
    """The filters as nftables in the bridges' namespace (`netns`, or the host's), as root."""

    recorded = False

    def __init__(self, netns: str = "", nft: str = "nft") -> None:
        self._netns = netns
        self._nft = nft
        self._sysctls_set = False
        self._lock = threading.Lock()
        # The sets as this process last wrote them: a set written already is not again.
        self._written: dict[str, tuple[IPNetwork, ...]] = {}

    def ensure(self, spec: PortFilterSpec, sets: GroupSets | None = None) -> RealizedFilter:
        kept = chains(spec)
        wanted = digest(spec.port_id, kept)
        sets = dict(sets or {})
        out = self._run_nft(("list", "chain", "bridge", TABLE, chain(spec.port_id, "out")),
                            missing_ok=True)
        found = _COMMENT.search(out)
        changed = found is None or found.group(1) != wanted
        if changed:
            self._bridged_traffic_to_conntrack()
            self._run_nft(("-f", "-"), stdin=ensure_script(spec, kept, sets))
            self._wrote(sets)
            log.info("port filter loaded", port_id=spec.port_id, rules=len(spec.rules),
                     netns=self._netns or "host")
        else:
            self.ensure_sets(sets)
        # What was loaded, as rendered (one process fewer than listing the table again,
        # which grows with the node's ports); port_filter_state lists what the kernel holds.
        return _rendered_chains(spec.port_id, wanted, kept, sets, recorded=False,
                                changed=changed)

    def ensure_sets(self, sets: GroupSets) -> None:
        with self._lock:
            stale = {name: networks for name, networks in sets.items()
                     if self._written.get(name) != networks}
        if not stale:
            return
        self._run_nft(("-f", "-"), stdin=sets_script(stale))
        self._wrote(stale)
        log.info("group sets loaded", sets=sorted(stale), netns=self._netns or "host")

    def drop_sets(self, names: Iterable[str]) -> None:
        for name in sorted(names):
            with self._lock:
                self._written.pop(name, None)
            try:
                self._run_nft(("delete", "set", "bridge", TABLE, name), missing_ok=True)
            except errors.FailedPrecondition as exc:  # still named by a chain made before
                log.info("group set kept", set=name, why=exc.message)

    def _wrote(self, sets: GroupSets) -> None:
        with self._lock:
            self._written.update(sets)

    def remove(self, port_id: str) -> bool:
        if not self._listed(self._table(), port_id):
            return False
        self._run_nft(("-f", "-"), stdin=remove_script(port_id))
        log.info("port filter removed", port_id=port_id, netns=self._netns or "host")
        return True

    def get(self, port_id: str) -> RealizedFilter:
        table = self._table()
        blocks = self._listed(table, port_id)
        if chain(port_id, "out") not in blocks:
            raise _not_found(port_id)
        named = {name for text in blocks.values() for name in _SET_REF.findall(text)}
        held = self._listed_sets(table, named)
        return RealizedFilter(filter_name(port_id), tuple(sorted(blocks)),
                              "".join(held[name] for name in sorted(held))
                              + "".join(blocks[name] for name in sorted(blocks)), False)

    def port_ids(self) -> list[str]:
        return sorted({match.group(2) for line in self._table().splitlines()
                       if (match := _PORT_CHAIN.match(line))})

    def _table(self) -> str:
        return self._run_nft(("list", "table", "bridge", TABLE), missing_ok=True)

    @staticmethod
    def _listed(table: str, port_id: str) -> dict[str, str]:
        """The port's chains in a table listing: name → its text as nft printed it."""
        return _blocks(table, _PORT_CHAIN, lambda match: match.group(2) == port_id)

    @staticmethod
    def _listed_sets(table: str, names: set[str]) -> dict[str, str]:
        """The sets of `names` in a table listing: name → its text as nft printed it."""
        return _blocks(table, _SET, lambda match: match.group(1) in names)

    def _bridged_traffic_to_conntrack(self) -> None:
        with self._lock:
            if self._sysctls_set:
                return
            if not os.path.isdir("/proc/sys/net/bridge") and shutil.which("modprobe"):
                # The sysctls come with br_netfilter (built in on some kernels, a module on
                # others); loading it is machine-wide and changes nothing until they are set.
                commands.run(["modprobe", "br_netfilter"])
            if self._netns:
                commands.run(["ip", "netns", "exec", self._netns, "sysctl", "-qw",
                              *(f"{name}=1" for name in SYSCTLS)])
            else:
                for name in SYSCTLS:
                    path = "/proc/sys/" + name.replace(".", "/")
                    try:
                        with open(path, "w", encoding="ascii") as file:
                            file.write("1\n")
                    except OSError as exc:
                        why = f"{exc} (is br_netfilter loaded?)"
                        raise commands.failed(["sysctl", name], why) from exc
            self._sysctls_set = True

    def _run_nft(self, args: Iterable[str], stdin: str | None = None,
                 missing_ok: bool = False) -> str:
        command = [self._nft, *args]
        if self._netns:
            command = ["ip", "netns", "exec", self._netns, *command]
        return commands.run(command, stdin, missing_ok=missing_ok)

class RecordingPortFilters(PortFilters):
    """The filters kept in memory, for nodes on libvirt's test driver: nothing is loaded."""

    recorded = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._filters: dict[str, tuple[str, dict[str, list[str]]]] = {}
        self._sets: dict[str, tuple[IPNetwork, ...]] = {}
        self._actions: collections.deque[str] = collections.deque(maxlen=MAX_ACTIONS)

    def ensure(self, spec: PortFilterSpec, sets: GroupSets | None = None) -> RealizedFilter:
        kept = chains(spec)
        wanted = digest(spec.port_id, kept)
        with self._lock:
            self._keep_sets(sets or {})
            current = self._filters.get(spec.port_id)
            changed = current is None or current[0] != wanted
            if changed:
                self._filters[spec.port_id] = (wanted, kept)
                self._actions.append(f"nft ensure {spec.port_id} {wanted}")
            held = {name: self._sets.get(name, ()) for name in named_sets(kept)}
        return _rendered_chains(spec.port_id, wanted, kept, held, recorded=True,
                                changed=changed)

    def ensure_sets(self, sets: GroupSets) -> None:
        with self._lock:
            self._keep_sets(sets)

    def drop_sets(self, names: Iterable[str]) -> None:
        with self._lock:
            named = {name for _, kept in self._filters.values() for name in named_sets(kept)}
            for name in sorted(set(names) - named):
                if self._sets.pop(name, None) is not None:
                    self._actions.append(f"nft delete set {name}")

    def _keep_sets(self, sets: GroupSets) -> None:
        for name, networks in sorted(sets.items()):
            if self._sets.get(name) != networks:
                self._sets[name] = networks
                self._actions.append(f"nft set {name} {len(networks)}")

    def remove(self, port_id: str) -> bool:
        with self._lock:
            if self._filters.pop(port_id, None) is None:
                return False
            self._actions.append(f"nft remove {port_id}")
            return True

    def get(self, port_id: str) -> RealizedFilter:
        with self._lock:
            current = self._filters.get(port_id)
            if current is None:
                raise _not_found(port_id)
            wanted, kept = current
            held = {name: self._sets.get(name, ()) for name in named_sets(kept)}
        return _rendered_chains(port_id, wanted, kept, held, recorded=True)

    def port_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._filters)

    def actions(self) -> list[str]:
        """The transactions recorded so far, oldest first."""
        with self._lock:
            return list(self._actions)


def _rendered_chains(port_id: str, wanted: str, kept: dict[str, list[str]], sets: GroupSets,
                     *, recorded: bool, changed: bool = False) -> RealizedFilter:
    """The port's chains as loaded (or recorded), after the sets they name, in `nft list`'s
    layout."""
    text = "".join(
        f"\tset {name} {{\n\t\ttype {_set_type(name)}\n"
        "\t\tflags interval\n"
        + (f"\t\telements = {{ {', '.join(_element(n) for n in sets[name])} }}\n"
           if sets[name] else "")
        + "\t}\n"
        for name in sorted(sets))
    text += "".join(
        f"\tchain {name} {{\n"
        + (f'\t\tcomment "nubis {wanted}"\n' if name.endswith("-out") else "")
        + "".join(f"\t\t{rule}\n" for rule in rules) + "\t}\n"
        for name, rules in sorted(kept.items()))
    return RealizedFilter(filter_name(port_id), tuple(sorted(kept)), text, recorded, changed)
