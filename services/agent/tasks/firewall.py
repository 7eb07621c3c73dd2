"""Security group tasks: a port's filter, made from its groups' rules.

ensure_port_filter carries the port's addresses and every rule of its
groups (remote groups already resolved to addresses), so a repeat converges;
it answers the filter's name and the `<interface>` fragment compute puts in
the domain. ensure and remove lock the port id; port_filter_state reads the
filter back as the node holds it.

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
    if bad:
        raise errors.InvalidArgument("the port's filter cannot be made as given", violations=bad)
    return port_rules.PortFilterSpec(
        port_id=request.port_id, mac=request.mac_address.lower(), addresses=tuple(addresses),
        allowed_pairs=tuple(pairs), port_security=request.port_security_enabled,
        rules=tuple(rules), group_ids=tuple(request.security_group_ids),
    )


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
    if len(bad) > before or family is None or protocol is None:
        return None
    return port_rules.Rule(direction, family, protocol, rule.port_range_min, rule.port_range_max,
                         remote, rule.rule_id)


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
    """The node's port filters: what the firewall tasks ensure, remove and read."""

    backend: str

    @abc.abstractmethod
    def ensure(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter: ...

    @abc.abstractmethod
    def remove(self, port_id: str) -> bool: ...

    @abc.abstractmethod
    def get(self, port_id: str) -> port_rules.RealizedFilter: ...

    def filterref_xml(self, port_id: str) -> str:
        """The `<filterref>` a domain's interface carries ("" if the domain needs none)."""
        return ""


class NftablesFilters(PortFilters):
    """Each port's chains in nftables, through the node's dataplane (or its recording)."""

    backend = "nftables"

    def __init__(self, ports: port_nft.PortFilters) -> None:
        self._ports = ports

    def ensure(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter:
        return self._ports.ensure(spec)

    def remove(self, port_id: str) -> bool:
        return self._ports.remove(port_id)

    def get(self, port_id: str) -> port_rules.RealizedFilter:
        return self._ports.get(port_id)



class NwFilters(PortFilters):
    """Each port's libvirt nwfilters, which libvirt applies when the guest's tap comes up."""

    backend = "nwfilter"

    def __init__(self, filters: nwfilter.Filters) -> None:
        self._filters = filters

    def ensure(self, spec: port_rules.PortFilterSpec) -> port_rules.RealizedFilter:
        return self._filters.ensure(spec)

    def remove(self, port_id: str) -> bool:
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
        found = self._filters.ensure(port_filter_spec(request))
        bridge = network_devices.bridge(request.network_id) if request.network_id else ""
        return _response(self._filters, found, request.port_id, request.mac_address.lower(),
                         bridge, request.mtu)


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
    return [EnsurePortFilter(filters), RemovePortFilter(filters), PortFilterState(filters)]
