"""Security groups on the nodes: each bound port's filter, built from its groups' rules.

The agent task ``network.ensure_port_filter`` takes a port's whole desired
filter (MAC, addresses, allowed pairs, port security, every rule of its
groups). A rule whose peer is a remote group names the group, and the
request carries the group's members (its bound ports' addresses, merged into
as few prefixes as cover exactly them, and the revision of the listing that
saw them): the node keeps one member list per remote group and resolves the
rules from it. `request_for` builds the request; binding a port sends it to
the port's node. `refresh` follows a change: the ports of a group whose
rules changed get their whole filter again; when a port is bound, unbound,
deleted or changes its addresses or groups, each node holding filters that
name one of its groups as their remote gets those groups' new member lists
(``network.ensure_group_members``, one task a node, whatever the number of
ports there that admit the group). A remote group's members are its bound
ports (an unbound port sends nothing to admit).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.network.v1 import port_pb2, security_group_pb2

from services.common import errors, resources, tasks
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.network import keys

Port = port_pb2.Port
Group = security_group_pb2.SecurityGroup
Rule = security_group_pb2.SecurityGroupRule
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

log = structlog.get_logger(__name__)

_DIRECTIONS = {Rule.DIRECTION_INGRESS: "ingress", Rule.DIRECTION_EGRESS: "egress"}
# Filters one refresh has in flight at once (each a task to the port's node).
_IN_FLIGHT = 32
# Of those, the most a background refresh has queued on one node: a bind's own filter (and
# a boot's tasks) sent there meanwhile waits behind at most this many, not behind every
# member the node holds (a node's worker takes one task at a time, whatever its priority).
_BACKGROUND_PER_NODE = 2


@dataclass(frozen=True)
class Snapshot:
    """Every port and group, as one listing read them: what filters are built from.

    A remote group's member addresses are worked out once per snapshot: every
    filter of a refresh resolves the same groups, so a refresh of N ports
    costs O(N) address parses, not O(N) per port.
    """

    ports: Sequence[Port]
    groups: Mapping[str, Group]
    revision: int = 0
    """The etcd revision the ports were listed at (what a node orders member lists by)."""
    _remotes: dict[str, tasks_pb2.GroupMembers] = field(default_factory=dict, compare=False,
                                                        repr=False)
    _resolved: dict[str, list[tasks_pb2.FilterRule]] = field(default_factory=dict,
                                                             compare=False, repr=False)

    def members(self, group_id: str) -> list[Port]:
        """The group's bound ports: only they send traffic a remote-group rule admits."""
        return [port for port in self.ports
                if port.node and group_id in port.security_group_ids]

    def group_members(self, group_id: str) -> tasks_pb2.GroupMembers:
        """The group's member list for the nodes: both families (kept per snapshot; the
        merge of the same addresses is made once for every snapshot, `_merged`)."""
        found = self._remotes.get(group_id)
        if found is None:
            given = tuple(sorted({candidate for member in self.members(group_id)
                                  for candidate in _candidates(member)}))
            found = self._remotes[group_id] = tasks_pb2.GroupMembers(
                group_id=group_id, addresses=_merged(given), revision=self.revision)
        return found

    def remote_groups(self, port: Port) -> list[str]:
        """The groups the rules of `port`'s filter name as their remote, sorted."""
        if not port.port_security_enabled:
            return []
        return sorted({rule.remote_group_id for group_id in port.security_group_ids
                       if (group := self.groups.get(group_id)) is not None
                       for rule in group.rules if rule.remote_group_id})


async def snapshot(store: Store) -> Snapshot:
    """Every port and group as of now (read through the store's mirrors: what changed)."""
    (ports, revision), (groups, _) = await asyncio.gather(
        store.mirror(keys.PORTS, Port).read(), store.mirror(keys.SECURITY_GROUPS, Group).read())
    return Snapshot([item.value for item in ports],
                    {item.value.meta.id: item.value for item in groups}, revision)


def _candidates(port: Port) -> list[str]:
    """A member's addresses as given: its fixed IPs and allowed address pairs."""
    return [*(ip.ip_address for ip in port.fixed_ips),
            *(pair.ip_address for pair in port.allowed_address_pairs)]


@functools.lru_cache(maxsize=256)
def _merged(candidates: tuple[str, ...]) -> tuple[str, ...]:
    """`candidates` parsed (those that are no address or network left out) and
    `_collapsed`: one group's members are the same from one snapshot to the next, until
    a member comes or goes, and every filter of a refresh names the group too."""
    networks: list[IPNetwork] = []
    for candidate in candidates:
        try:
            networks.append(ipaddress.ip_network(candidate, strict=False))
        except ValueError:
            continue
    return tuple(_collapsed(networks))


def _collapsed(networks: list[IPNetwork]) -> list[str]:
    """`networks` (one family) merged into the fewest CIDRs covering exactly the same
    addresses, a single address shown bare. A group's members mostly hold neighbouring
    addresses of one subnet, so the rule admitting N members is a handful of prefixes,
    not N: a filter's size stops growing with its group, and so does every refresh."""
    merged: list[IPNetwork] = [
        *ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv4Network)),
        *ipaddress.collapse_addresses(n for n in networks if isinstance(n, ipaddress.IPv6Network))]
    return [str(network) if network.num_addresses > 1 else str(network.network_address)
            for network in merged]


def resolve(rule: Rule, seen: Snapshot) -> list[tasks_pb2.FilterRule]:
    """The rule for the agent: its peer a prefix, or its remote group by id, the node
    resolving it from the group's member list (made once per snapshot)."""
    found = seen._resolved.get(rule.meta.id) if rule.meta.id else None
    if found is not None:
        return found
    found = [tasks_pb2.FilterRule(
        rule_id=rule.meta.id, direction=_DIRECTIONS.get(rule.direction, "ingress"),
        ethertype="IPv6" if rule.ether_type == Rule.ETHER_TYPE_IPV6 else "IPv4",
        protocol=rule.protocol, port_range_min=rule.port_range_min,
        port_range_max=rule.port_range_max,
        remote_ip_prefix="" if rule.remote_group_id else rule.remote_ip_prefix,
        remote_group_id=rule.remote_group_id)]
    if rule.meta.id:
        seen._resolved[rule.meta.id] = found
    return found


def request_for(port: Port, seen: Snapshot) -> tasks_pb2.EnsurePortFilterRequest:
    """The whole desired filter of `port` (no rules when port security is off), with the
    member lists of the remote groups its rules name."""
    request = tasks_pb2.EnsurePortFilterRequest(
        port_id=port.meta.id, mac_address=port.mac_address,
        fixed_ips=[ip.ip_address for ip in port.fixed_ips],
        port_security_enabled=port.port_security_enabled, network_id=port.network_id,
        security_group_ids=list(port.security_group_ids))
    for pair in port.allowed_address_pairs:
        request.allowed_address_pairs.add(ip_address=pair.ip_address,
                                          mac_address=pair.mac_address)
    if port.port_security_enabled:
        for group_id in port.security_group_ids:
            group = seen.groups.get(group_id)
            for rule in group.rules if group is not None else ():
                request.rules.extend(resolve(rule, seen))
        request.remote_groups.extend(seen.group_members(group_id)
                                     for group_id in seen.remote_groups(port))
    return request


def touched(seen: Snapshot, rules_of: Iterable[str] = (), *,
            skip: Iterable[str] = ()) -> list[Port]:
    """Bound ports of the groups `rules_of` (whose rules changed), by id, less `skip`
    (ports already given their new filter): their whole filter changes."""
    changed_rules, skipped = set(rules_of), set(skip)
    chosen = [port for port in seen.ports if port.node and port.meta.id not in skipped
              and changed_rules & set(port.security_group_ids)]
    return sorted(chosen, key=lambda port: port.meta.id)


def _admitting(seen: Snapshot, members_of: set[str]) -> set[str]:
    """Groups with a rule naming one of `members_of` as its remote."""
    return {group_id for group_id, group in seen.groups.items()
            if any(rule.remote_group_id in members_of for rule in group.rules)}


def member_lists(seen: Snapshot, members_of: Iterable[str], *, skip: Iterable[str] = (),
                 ) -> dict[str, tasks_pb2.EnsureGroupMembersRequest]:
    """Per node, the new member lists of `members_of` its filters name, and the ports of
    its filters naming them (`skip`: ports that were sent their whole filter, lists and all).
    """
    changed, skipped = set(members_of), set(skip)
    admitting = _admitting(seen, changed)
    wanted: dict[str, tuple[set[str], list[str]]] = {}
    for port in seen.ports:
        if not port.node or port.meta.id in skipped or not port.port_security_enabled \
                or port.device_owner.startswith("network:") \
                or not admitting & set(port.security_group_ids):
            continue
        groups, port_ids = wanted.setdefault(port.node, (set(), []))
        groups.update(changed.intersection(seen.remote_groups(port)))
        port_ids.append(port.meta.id)
    return {node: tasks_pb2.EnsureGroupMembersRequest(
                groups=[seen.group_members(group_id) for group_id in sorted(groups)],
                port_ids=sorted(port_ids))
            for node, (groups, port_ids) in sorted(wanted.items()) if groups}


async def refresh(store: Store, sender: TaskSender, rules_of: Iterable[str] = (),
                  members_of: Iterable[str] = (), *, skip: Iterable[str] = (),
                  operation_id: tasks.OperationId | None = None, background: bool = False,
                  ) -> dict[str, tasks_pb2.PortFilter]:
    """Send what a change touched: the whole filter of every bound port of `rules_of`
    (groups whose rules changed), and to every node with filters naming one of
    `members_of` (groups whose members changed) as remote, the groups' new member lists.

    Answers each whole filter sent as its node defined it. A node that held
    no filter of a port it was sent lists for (an agent restarted since) is
    sent that port's whole filter. A node that does not answer is logged and
    left out: the rule is stored, and the port's filter is rebuilt from it
    the next time it is bound or refreshed. `background` tasks wait on their
    nodes behind the tasks of binds and boots, and whole filters are sent at
    most `_BACKGROUND_PER_NODE` a node at a time.
    """
    seen = await snapshot(store)
    whole = touched(seen, rules_of, skip=skip)
    lists = member_lists(seen, members_of, skip=[*skip, *(port.meta.id for port in whole)])
    operation = operation_id or tasks.new_operation_id()
    by_id = {port.meta.id: port for port in seen.ports}

    gate = asyncio.Semaphore(_IN_FLIGHT)
    nodes: dict[str, asyncio.Semaphore] = {}

    async def one(port: Port) -> tuple[str, tasks_pb2.PortFilter | None]:
        node_gate = nodes.setdefault(port.node, asyncio.Semaphore(
            _BACKGROUND_PER_NODE if background else _IN_FLIGHT))
        try:
            async with node_gate, gate:
                answer = await sender.send(port.node, tasks.ENSURE_PORT_FILTER,
                                           request_for(port, seen), operation_id=operation,
                                           background=background)
        except errors.NubisError as exc:
            log.warning("port filter not applied", port_id=port.meta.id, node=port.node,
                        reason=exc.reason, error=exc.message, operation_id=operation)
            return port.meta.id, None
        return port.meta.id, answer

    async def node_lists(node: str, request: tasks_pb2.EnsureGroupMembersRequest,
                         ) -> list[tuple[str, tasks_pb2.PortFilter | None]]:
        try:
            async with gate:
                answer = await sender.send(node, tasks.ENSURE_GROUP_MEMBERS, request,
                                           operation_id=operation, background=background)
        except errors.NubisError as exc:
            log.warning("group members not sent", node=node, reason=exc.reason,
                        error=exc.message, operation_id=operation)
            return []
        missing = [by_id[port_id] for port_id in answer.missing_port_ids if port_id in by_id]
        return list(await asyncio.gather(*(one(port) for port in missing)))

    answers = [*await asyncio.gather(*(one(port) for port in whole)),
               *(answer for part in await asyncio.gather(
                   *(node_lists(node, request) for node, request in lists.items()))
                 for answer in part)]
    return {port_id: answer for port_id, answer in answers if answer is not None}


async def apply(store: Store, sender: TaskSender, port_id: str, *,
                operation_id: tasks.OperationId | None = None) -> tasks_pb2.PortFilter | None:
    """Send one bound port's filter to its node (what binding does once the port is bound).

    None when the port is gone or unbound. The node's errors are raised.
    """
    seen = await snapshot(store)
    chosen = next((port for port in seen.ports if port.meta.id == port_id), None)
    if chosen is None or not chosen.node:
        return None
    return await sender.send(chosen.node, tasks.ENSURE_PORT_FILTER, request_for(chosen, seen),
                             operation_id=operation_id or tasks.new_operation_id())


async def remove(sender: TaskSender, port_id: str, node: str, *,
                 operation_id: tasks.OperationId | None = None) -> None:
    """Undefine a port's filter on the node it left (unbind, delete); a missing one is done."""
    await sender.send(node, tasks.REMOVE_PORT_FILTER,
                      tasks_pb2.RemovePortFilterRequest(port_id=port_id),
                      operation_id=operation_id or tasks.new_operation_id())


async def on_bind(store: Store, sender: TaskSender, port_id: str) -> None:
    """After a bind: define the port's filter on its node and name it in binding_details.

    Ports the network service owns (routers, DHCP) get none. A node that does
    not answer is logged; the filter is sent again on the next rule change or bind.
    """
    found = await store.find(keys.port(port_id), Port)
    if found is None or not found.value.node or found.value.device_owner.startswith("network:"):
        return
    try:
        answer = await apply(store, sender, port_id)
    except errors.NubisError as exc:
        log.warning("port filter not applied", port_id=port_id, node=found.value.node,
                    reason=exc.reason, error=exc.message)
        return
    if answer is not None:
        await _name_filter(store, found.value, answer)
    # The port is now a member its groups' remote-group rules admit elsewhere.
    await refresh(store, sender, members_of=found.value.security_group_ids, skip=[port_id])


async def define_bound(store: Store, sender: TaskSender, port_ids: Iterable[str]) -> set[str]:
    """Define the filters of ports just bound (one snapshot, sent at once); name them.

    The `on_bind` of many ports without its refresh: answers the groups of the
    ports defined, whose remote-group admitters the caller refreshes (`refresh`
    with ``members_of``), at once or soon after.
    """
    seen = await snapshot(store)
    wanted = set(port_ids)
    chosen = [port for port in seen.ports if port.meta.id in wanted and port.node
              and not port.device_owner.startswith("network:")]
    operation = tasks.new_operation_id()
    gate = asyncio.Semaphore(_IN_FLIGHT)

    async def one(port: Port) -> None:
        try:
            async with gate:
                answer = await sender.send(port.node, tasks.ENSURE_PORT_FILTER,
                                           request_for(port, seen), operation_id=operation)
        except errors.NubisError as exc:
            log.warning("port filter not applied", port_id=port.meta.id, node=port.node,
                        reason=exc.reason, error=exc.message, operation_id=operation)
            return
        await _name_filter(store, port, answer)

    await asyncio.gather(*(one(port) for port in chosen))
    return {group for port in chosen for group in port.security_group_ids}


async def _name_filter(store: Store, bound: Port, answer: tasks_pb2.PortFilter) -> None:
    def mutate(record: Port) -> Port | None:
        if record.node != bound.node:
            return None
        details = {"port_filter": answer.filter_name, "filterref_xml": answer.filterref_xml}
        if all(record.binding_details.get(key) == value for key, value in details.items()):
            return None
        record.binding_details.update(details)
        return record

    try:
        await store.update(keys.port(bound.meta.id), Port, mutate)
    except errors.NotFound:
        return


async def on_unbind(sender: TaskSender, before: Port, *, node_down: bool = False) -> list[str]:
    """After an unbind (or the delete of a bound port): the filter leaves the old node.

    `before` is the port as it was while bound. Answers its groups: the
    remote-group rules elsewhere that admitted its addresses must stop, so the
    caller refreshes their filters (``refresh(members_of=...)``, coalesced with
    other changes: a burst of deletes costs a few refreshes, not one each).
    A DOWN node (`node_down`) is not asked to remove the filter: nobody would answer.
    """
    if not before.node or before.device_owner.startswith("network:"):
        return []
    try:
        if not node_down:
            await remove(sender, before.meta.id, before.node)
    except errors.NubisError as exc:
        log.warning("port filter not removed", port_id=before.meta.id, node=before.node,
                    reason=exc.reason, error=exc.message)
    return list(before.security_group_ids)


async def on_change(store: Store, sender: TaskSender, before: Port, after: Port) -> None:
    """After an update of a bound port: its own filter and its groups' dependents, if needed."""
    fields = ("security_group_ids", "fixed_ips", "allowed_address_pairs",
              "port_security_enabled", "mac_address")
    if not after.node or after.device_owner.startswith("network:") or all(
            getattr(before, name) == getattr(after, name) for name in fields):
        return
    try:
        answer = await apply(store, sender, after.meta.id)
    except errors.NubisError as exc:
        log.warning("port filter not applied", port_id=after.meta.id, node=after.node,
                    reason=exc.reason, error=exc.message)
    else:
        if answer is not None:
            await _name_filter(store, after, answer)
    groups = [*before.security_group_ids, *after.security_group_ids]
    await refresh(store, sender, members_of=dict.fromkeys(groups), skip=[after.meta.id])


async def current(store: Store, port_id: str) -> Port | None:
    """The port as stored now (None: missing or not an id), to compare after a change."""
    if not resources.is_uuid(port_id):
        return None
    found = await store.find(keys.port(port_id), Port)
    return found.value if found is not None else None
