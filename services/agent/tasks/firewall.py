"""Security group tasks: a port's filter, made from its groups' rules.

ensure_port_filter carries the port's addresses, every rule of its groups
and the members of the remote groups those rules name, so a repeat
converges; it answers the filter's name and the `<interface>` fragment
compute puts in the domain. ensure and remove lock the port id;
port_filter_state reads the filter back as the node holds it.

A rule whose peer is a remote group is resolved on the node: the node keeps
each remote group's member list (the newest revision it was given, by a
port's filter or by ensure_group_members) and the filters it made. On
nftables the chains match the group's named set, and a changed list rewrites
the set, once for the node (Neutron's ipsets play this part); with nwfilters
every filter naming the group is made again. A member coming or going is
then one ensure_group_members a node, not one ensure_port_filter for every
port that admits the group. The lists live in the agent's memory: after a restart the
node holds no filter it knows of, and ensure_group_members answers the ports
it was told of as missing, for their sender to send whole.

The node enforces filters one of two ways (`agent.port_filter`): nftables
chains on the bridge, loaded here before the guest starts
(`dataplane.port_nft`, the default: nothing for libvirt to do when the domain
starts), or libvirt nwfilters the domain's interface references
(`driver.nwfilter`: libvirt instantiates them as it starts the guest).
"""

from __future__ import annotations

import abc
import ipaddress
import re
import threading
from collections.abc import Iterable
from typing import Any

import structlog
from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent import port_rules
from services.agent.dataplane import base as dataplane_base
from services.agent.dataplane import port_nft
from services.agent.driver import nwfilter
from services.agent.tasks import phases
from services.common import errors, network_devices, tasks

log = structlog.get_logger(__name__)

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_DIRECTIONS = ("ingress", "egress")
_FAMILIES = {"": 4, "ipv4": 4, "ipv6": 6}


def port_filter_spec(request: tasks_pb2.EnsurePortFilterRequest) -> port_rules.PortFilterSpec:
    """The filter a request describes; InvalidArgument naming every bad field."""
    bad: list[errors.FieldViolation] = []
    _check_port_id(request.port_id, bad)
    if not _MAC.match(request.mac_address):
        bad.append(errors.FieldViolation("mac_address",
                                         "must be a MAC (aa:bb:cc:dd:ee:ff)"))
    addresses = []
    for i, text in enumerate(request.fixed_ips):
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            bad.append(errors.FieldViolation(f"fixed_ips[{i}]", "must be an IP address"))
    pairs = []
    for i, pair in enumerate(request.allowed_address_pairs):
        where = f"allowed_address_pairs[{i}]"
        if pair.mac_address and not _MAC.match(pair.mac_address):
            bad.append(errors.FieldViolation(f"{where}.mac_address", "must be a MAC"))
        try:
            pairs.append(port_rules.AddressPair((pair.mac_address or request.mac_address).lower(),
                                              ipaddress.ip_network(pair.ip_address, strict=False)))
        except ValueError:
            bad.append(errors.FieldViolation(f"{where}.ip_address", "must be an address or CIDR"))
    rules = [rule for i, item in enumerate(request.rules)
             if (rule := _rule(item, f"rules[{i}]", bad)) is not None]
    if request.network_id and not _UUID.match(request.network_id):
        bad.append(errors.FieldViolation("network_id", "must be a lower-case UUID"))
    if request.mtu and not 68 <= request.mtu <= 9000:
        bad.append(errors.FieldViolation("mtu", "must be 0 or 68..9000"))
    _group_members(request.remote_groups, "remote_groups", bad)
    if bad:
        raise errors.InvalidArgument("the port's filter cannot be made as given", violations=bad)
    return port_rules.PortFilterSpec(
        port_id=request.port_id, mac=request.mac_address.lower(), addresses=tuple(addresses),
        allowed_pairs=tuple(pairs), port_security=request.port_security_enabled,
        rules=tuple(rules), group_ids=tuple(request.security_group_ids),
    )


def group_members(items: Iterable[tasks_pb2.GroupMembers],
                  where: str) -> list[port_rules.GroupMembers]:
    """The member lists of a request; InvalidArgument naming every bad field."""
    bad: list[errors.FieldViolation] = []
    found = _group_members(items, where, bad)
    if bad:
        raise errors.InvalidArgument("the groups' members cannot be taken as given",
                                     violations=bad)
    return found


def _group_members(items: Iterable[tasks_pb2.GroupMembers], where: str,
                   bad: list[errors.FieldViolation]) -> list[port_rules.GroupMembers]:
    found: list[port_rules.GroupMembers] = []
    for i, item in enumerate(items):
        before = len(bad)
        if not _UUID.match(item.group_id):
            bad.append(errors.FieldViolation(f"{where}[{i}].group_id",
                                             "must be a lower-case UUID"))
        if item.revision < 0:
            bad.append(errors.FieldViolation(f"{where}[{i}].revision", "must not be negative"))
        networks: list[port_rules.IPNetwork] = []
        for j, text in enumerate(item.addresses):
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                bad.append(errors.FieldViolation(f"{where}[{i}].addresses[{j}]",
                                                 "must be an address or CIDR"))
        if len(bad) == before:
            found.append(port_rules.GroupMembers(item.group_id, tuple(networks), item.revision))
    return found


def _rule(rule: tasks_pb2.FilterRule, where: str,
          bad: list[errors.FieldViolation]) -> port_rules.Rule | None:
    before = len(bad)
    direction = rule.direction.lower()
    if direction not in _DIRECTIONS:
        bad.append(errors.FieldViolation(f"{where}.direction", "must be ingress or egress"))
    family = _FAMILIES.get(rule.ethertype.lower())
    if family is None:
        bad.append(errors.FieldViolation(f"{where}.ethertype", "must be IPv4 or IPv6"))
    if port_rules.PROTOCOL_NAMES.get(rule.protocol.lower()) is None \
            and _other_protocol(rule.protocol):
        # nwfilter names no other IP protocol at layer 3, so (on either backend,
        # that they filter alike) the rule cannot allow it: the traffic stays
        # dropped, as safer than allowing more.
        log.warning("rule skipped: its protocol cannot be matched", rule_id=rule.rule_id,
                    protocol=rule.protocol)
        return None
    protocol = _protocol(rule, family, where, bad)
    _check_ports(rule, protocol, where, bad)
    remote = _remote(rule, family, where, bad)
    if rule.remote_group_id:
        if not _UUID.match(rule.remote_group_id):
            bad.append(errors.FieldViolation(f"{where}.remote_group_id",
                                             "must be a lower-case UUID"))
        elif rule.remote_ip_prefix:
            bad.append(errors.FieldViolation(f"{where}.remote_group_id",
                                             "cannot be given with remote_ip_prefix"))
    if len(bad) > before or family is None or protocol is None:
        return None
    return port_rules.Rule(direction, family, protocol, rule.port_range_min, rule.port_range_max,
                         remote, rule.rule_id, rule.remote_group_id)


def _protocol(rule: tasks_pb2.FilterRule, family: int | None, where: str,
              bad: list[errors.FieldViolation]) -> str | None:
    protocol = port_rules.PROTOCOL_NAMES.get(rule.protocol.lower())
    if protocol is None:
        bad.append(errors.FieldViolation(f"{where}.protocol",
                                         f"unknown protocol {rule.protocol!r}"))
    elif protocol == "igmp" and family == 6:
        bad.append(errors.FieldViolation(f"{where}.protocol", "igmp is IPv4 only"))
    elif rule.protocol.lower() in ("icmpv6", "ipv6-icmp", "58") and family == 4:
        bad.append(errors.FieldViolation(f"{where}.protocol", "icmpv6 needs ethertype IPv6"))
    return protocol


def _remote(rule: tasks_pb2.FilterRule, family: int | None, where: str,
            bad: list[errors.FieldViolation]) -> port_rules.IPNetwork | None:
    if not rule.remote_ip_prefix:
        return None
    try:
        remote = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
    except ValueError:
        bad.append(errors.FieldViolation(f"{where}.remote_ip_prefix", "must be a CIDR"))
        return None
    if family is not None and remote.version != family:
        bad.append(errors.FieldViolation(f"{where}.remote_ip_prefix",
                                         f"is not an IPv{family} prefix"))
    return remote


def _other_protocol(text: str) -> bool:
    """An IP protocol the API accepts that nwfilter cannot match (gre, or another number)."""
    lowered = text.strip().lower()
    return lowered == "gre" or (lowered.isdigit() and int(lowered) <= 255)


def _check_ports(rule: tasks_pb2.FilterRule, protocol: str | None, where: str,
                 bad: list[errors.FieldViolation]) -> None:
    low, high = rule.port_range_min, rule.port_range_max
    if protocol == "icmp":
        if not (-1 <= low <= 255 and -1 <= high <= 255):
            bad.append(errors.FieldViolation(f"{where}.port_range_min",
                                             "ICMP type and code must be -1..255"))
    elif protocol in port_rules.PORTED:
        if not 0 <= low <= 65535:
            bad.append(errors.FieldViolation(f"{where}.port_range_min", "must be 0..65535"))
        if not 0 <= high <= 65535 or (high and high < low):
            bad.append(errors.FieldViolation(f"{where}.port_range_max",
                                             "must be 0..65535 and not below port_range_min"))
    elif low or high:
        bad.append(errors.FieldViolation(f"{where}.port_range_min",
                                         f"protocol {rule.protocol or 'any'} takes no ports"))


def _check_port_id(port_id: str, bad: list[errors.FieldViolation]) -> None:
    if not _UUID.match(port_id):
        bad.append(errors.FieldViolation("port_id", "must be a lower-case UUID"))


def _port_id_only(port_id: str) -> None:
    bad: list[errors.FieldViolation] = []
    _check_port_id(port_id, bad)
    if bad:
        raise errors.InvalidArgument("port_id must be a port's UUID", violations=bad)


class PortFilters(abc.ABC):
    """The node's port filters: what the firewall tasks ensure, remove and read.

    Keeps the remote groups' member lists and the spec of every filter made,
    to resolve remote-group rules (`PortFilterSpec.resolved`) and to make the
    filters naming a group again when its list changes. One lock orders every
    change of the node's filters and lists.
    """

    backend: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: dict[str, port_rules.GroupMembers] = {}
        self._specs: dict[str, port_rules.PortFilterSpec] = {}

    def ensure(self, spec: port_rules.PortFilterSpec,
               groups: Iterable[port_rules.GroupMembers] = ()) -> port_rules.RealizedFilter:
        """Take the newer of `groups`' lists, make the port's filter, and make again the
        other filters naming a group whose list changed."""
        with self._lock:
            changed = self._take(groups)
            before = self._specs.get(spec.port_id)
            self._specs[spec.port_id] = spec
            found = self._define(spec)
            self._refilter(changed, skip=spec.port_id)
            if before is not None:
                self._unnamed(before)
        return found

    def ensure_members(self, groups: Iterable[port_rules.GroupMembers],
                       port_ids: Iterable[str] = ()) -> tasks_pb2.EnsureGroupMembersResponse:
        """Take the newer of `groups`' lists and make again every filter naming a changed
        one; which of `port_ids` the node holds no filter for."""
        with self._lock:
            changed = self._take(groups)
            refiltered = self._refilter(changed)
            missing = sorted(set(port_ids) - self._specs.keys())
        return tasks_pb2.EnsureGroupMembersResponse(
            changed_group_ids=sorted(changed), refiltered_port_ids=refiltered,
            missing_port_ids=missing)

    def remove(self, port_id: str) -> bool:
        with self._lock:
            before = self._specs.pop(port_id, None)
            removed = self._undefine(port_id)
            if before is not None:
                self._unnamed(before)
            return removed

    def _take(self, groups: Iterable[port_rules.GroupMembers]) -> set[str]:
        """Keep each list newer than the one held; the groups whose members changed."""
        changed: set[str] = set()
        for group in groups:
            held = self._members.get(group.group_id)
            if held is not None and held.revision > group.revision:
                continue  # a listing older than the one the node has
            self._members[group.group_id] = group
            if held is None or set(held.networks) != set(group.networks):
                changed.add(group.group_id)
        return changed

    def _refilter(self, groups: set[str], skip: str = "") -> list[str]:
        """Make again the filters of the node that name one of `groups`; their port ids."""
        if not groups:
            return []
        again = sorted(port_id for port_id, spec in self._specs.items()
                       if port_id != skip and spec.remote_groups() & groups)
        if again:
            self._regroup(groups, again)
            log.info("port filters changed by new group members", groups=sorted(groups),
                     ports=len(again))
        return again

    def _regroup(self, groups: set[str], port_ids: list[str]) -> None:
        """Bring the filters of `port_ids` to the new lists of `groups`: made again."""
        for port_id in port_ids:
            self._define(self._specs[port_id])

    def _unnamed(self, before: port_rules.PortFilterSpec) -> None:
        """After a filter made of `before` changed or went: what it alone used goes
        (nothing, where each filter holds all it uses)."""
        return

    @abc.abstractmethod
    def _define(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter:
        """Make the port's filter exactly `spec`'s, its remote groups' rules as the lists
        held say."""

    @abc.abstractmethod
    def _undefine(self, port_id: str) -> bool: ...

    @abc.abstractmethod
    def get(self, port_id: str) -> port_rules.RealizedFilter: ...

    def filterref_xml(self, port_id: str) -> str:
        """The `<filterref>` a domain's interface carries ("" if the domain needs none)."""
        return ""


class NftablesFilters(PortFilters):
    """Each port's chains in nftables, through the node's dataplane (or its recording)."""

    backend = "nftables"

    def __init__(self, ports: port_nft.PortFilters) -> None:
        super().__init__()
        self._ports = ports

    def _define(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter:
        return self._ports.ensure(spec, port_nft.sets_of(spec, self._members))

    def _regroup(self, groups: set[str], port_ids: list[str]) -> None:
        """The chains name the groups' sets: the sets are written, once each."""
        sets: dict[str, tuple[port_rules.IPNetwork, ...]] = {}
        for port_id in port_ids:
            sets.update(port_nft.sets_of(self._specs[port_id], self._members, groups))
        self._ports.ensure_sets(sets)

    def _unnamed(self, before: port_rules.PortFilterSpec) -> None:
        named = {pair for spec in self._specs.values() for pair in spec.remote_sets()}
        gone = before.remote_sets() - named
        if gone:
            self._ports.drop_sets(port_nft.group_set(group, family) for group, family in gone)

    def _undefine(self, port_id: str) -> bool:
        return self._ports.remove(port_id)

    def get(self, port_id: str) -> port_rules.RealizedFilter:
        return self._ports.get(port_id)



class NwFilters(PortFilters):
    """Each port's libvirt nwfilters, which libvirt applies when the guest's tap comes up."""

    backend = "nwfilter"

    def __init__(self, filters: nwfilter.Filters) -> None:
        super().__init__()
        self._filters = filters

    def _define(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter:
        return self._filters.ensure(spec.resolved(self._members))

    def _undefine(self, port_id: str) -> bool:
        return self._filters.remove(port_id)

    def get(self, port_id: str) -> port_rules.RealizedFilter:
        return self._filters.get(port_id)

    def filterref_xml(self, port_id: str) -> str:
        return nwfilter.filterref_xml(port_id)



def choose(kind: str, driver: driver_module.Driver,
           dataplane: dataplane_base.Dataplane) -> PortFilters:
    """The node's port filters by `agent.port_filter`: "nftables" or "nwfilter"."""
    if kind == "nwfilter":
        return NwFilters(driver.filters)
    return NftablesFilters(dataplane.ports)


def _response(filters: PortFilters, found: port_rules.RealizedFilter, port_id: str, mac: str = "",
              bridge: str = "", mtu: int = 0) -> tasks_pb2.PortFilter:
    filterref = filters.filterref_xml(port_id)
    return tasks_pb2.PortFilter(
        port_id=port_id, filter_name=found.name, filterref_xml=filterref,
        interface_xml=nwfilter.interface_xml(port_id, mac, bridge, mtu,
                                             network_devices.tap(port_id),
                                             filtered=bool(filterref)) if mac else "",
        filter_xml=found.text, filter_names=found.names, recorded=found.recorded,
        changed=found.changed, backend=filters.backend,
    )


class EnsurePortFilter(phases.AgentTask[tasks_pb2.EnsurePortFilterRequest, tasks_pb2.PortFilter]):
    """Define (or redefine) the port's filter from its groups' rules."""

    spec = tasks.ENSURE_PORT_FILTER

    def __init__(self, filters: PortFilters) -> None:
        self._filters = filters

    def check_arguments(self, request: tasks_pb2.EnsurePortFilterRequest) -> None:
        port_filter_spec(request)

    def lock_key(self, request: tasks_pb2.EnsurePortFilterRequest) -> str:
        return f"port-filter/{request.port_id}"

    def execute(self, request: tasks_pb2.EnsurePortFilterRequest,
                ctx: phases.Context) -> tasks_pb2.PortFilter:
        found = self._filters.ensure(port_filter_spec(request),
                                     group_members(request.remote_groups, "remote_groups"))
        bridge = network_devices.bridge(request.network_id) if request.network_id else ""
        return _response(self._filters, found, request.port_id, request.mac_address.lower(),
                         bridge, request.mtu)


class EnsureGroupMembers(phases.AgentTask[tasks_pb2.EnsureGroupMembersRequest,
                                          tasks_pb2.EnsureGroupMembersResponse]):
    """Take remote groups' new member lists; make again the filters naming them."""

    spec = tasks.ENSURE_GROUP_MEMBERS

    def __init__(self, filters: PortFilters) -> None:
        self._filters = filters

    def check_arguments(self, request: tasks_pb2.EnsureGroupMembersRequest) -> None:
        bad: list[errors.FieldViolation] = []
        _group_members(request.groups, "groups", bad)
        for i, port_id in enumerate(request.port_ids):
            if not _UUID.match(port_id):
                bad.append(errors.FieldViolation(f"port_ids[{i}]", "must be a lower-case UUID"))
        if bad:
            raise errors.InvalidArgument("the groups' members cannot be taken as given",
                                         violations=bad)

    def execute(self, request: tasks_pb2.EnsureGroupMembersRequest,
                ctx: phases.Context) -> tasks_pb2.EnsureGroupMembersResponse:
        return self._filters.ensure_members(group_members(request.groups, "groups"),
                                            request.port_ids)


class RemovePortFilter(
    phases.AgentTask[tasks_pb2.RemovePortFilterRequest, tasks_pb2.RemovePortFilterResponse]
):
    """Remove the port's filter; a port with none is done."""

    spec = tasks.REMOVE_PORT_FILTER

    def __init__(self, filters: PortFilters) -> None:
        self._filters = filters

    def check_arguments(self, request: tasks_pb2.RemovePortFilterRequest) -> None:
        _port_id_only(request.port_id)

    def lock_key(self, request: tasks_pb2.RemovePortFilterRequest) -> str:
        return f"port-filter/{request.port_id}"

    def execute(self, request: tasks_pb2.RemovePortFilterRequest,
                ctx: phases.Context) -> tasks_pb2.RemovePortFilterResponse:
        return tasks_pb2.RemovePortFilterResponse(port_id=request.port_id,
                                                  changed=self._filters.remove(request.port_id))


class PortFilterState(phases.AgentTask[tasks_pb2.PortFilterStateRequest, tasks_pb2.PortFilter]):
    """The port's filter as the node holds it now; NotFound when it has none."""

    spec = tasks.PORT_FILTER_STATE

    def __init__(self, filters: PortFilters) -> None:
        self._filters = filters

    def check_arguments(self, request: tasks_pb2.PortFilterStateRequest) -> None:
        _port_id_only(request.port_id)

    def execute(self, request: tasks_pb2.PortFilterStateRequest,
                ctx: phases.Context) -> tasks_pb2.PortFilter:
        return _response(self._filters, self._filters.get(request.port_id), request.port_id)


def all_tasks(filters: PortFilters) -> list[phases.AgentTask[Any, Any]]:
    return [EnsurePortFilter(filters), EnsureGroupMembers(filters), RemovePortFilter(filters),
            PortFilterState(filters)]
