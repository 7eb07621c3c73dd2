"""Security group rules: one allow rule of a group, immutable once made.

A rule lives inside its group's record (what a port's filter is built from)
and under its own key ``network/security-group-rules/<id>`` (Get/List by rule
id); both are written in one transaction with the group's compare, so a rule
is never half made, and quota ``security_group_rules`` moves in the same
commit. After the commit, the change is re-applied to every bound port of the
group (`port_filter.refresh`).
"""

from __future__ import annotations

import ipaddress

from nubis.network.v1 import network_service_pb2, security_group_pb2

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.common.task_sender import TaskSender
from services.network import keys, port_filter, security_group

Rule = security_group_pb2.SecurityGroupRule
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateSecurityGroupRule")
DUPLICATE = "nubis.security_group_rule.duplicate"
_FIELD = "security_group_rule"
# Protocols by name, with their IP protocol numbers; "" (or "any") is every protocol.
PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "sctp": 132,
             "gre": 47, "esp": 50, "ah": 51, "igmp": 2}
_PORTED = frozenset({"tcp", "udp", "sctp"})
_ICMP = frozenset({"icmp", "icmpv6"})
_MAX_PORT = 65535


def _protocol(violations: errors.ViolationCollector, rule: Rule) -> str:
    """The protocol as stored: a lower-case name, a number 0-255 for others, "" for any."""
    raw = rule.protocol.strip().lower()
    if raw in ("", "any"):
        return ""
    if raw.isdigit():
        number = int(raw)
        if number > 255:
            violations.add(f"{_FIELD}.protocol", "an IP protocol number is 0-255")
            return raw
        # A known protocol by number is stored by name, so duplicates are found.
        by_number = {value: name for name, value in PROTOCOLS.items() if name != "ipv6-icmp"}
        return by_number.get(number, str(number))
    if raw not in PROTOCOLS:
        violations.add(f"{_FIELD}.protocol", "one of " + ", ".join(sorted(PROTOCOLS))
                       + ", an IP protocol number 0-255, or any")
        return raw
    if raw == "ipv6-icmp" or (raw == "icmp" and rule.ether_type == Rule.ETHER_TYPE_IPV6):
        return "icmpv6"
    return raw


def _port_range(violations: errors.ViolationCollector, protocol: str, low: int,
                high: int) -> None:
    lowest, highest = f"{_FIELD}.port_range_min", f"{_FIELD}.port_range_max"
    if protocol in _PORTED:
        _ports(violations, low, high)
    elif protocol in _ICMP:
        # min is the ICMP type, max the code; -1 (or 0 and 0) is any.
        for field, value in ((lowest, low), (highest, high)):
            if not -1 <= value <= 255:
                violations.add(field, "an ICMP type or code is 0-255, -1 for any")
        if low == -1 and high not in (-1, 0):
            violations.add(highest, "a code needs a type in port_range_min")
    elif (low, high) != (0, 0):
        violations.add(lowest, "port ranges apply to tcp, udp, sctp and icmp only")


def _ports(violations: errors.ViolationCollector, low: int, high: int) -> None:
    if (low, high) == (0, 0):
        return  # every port
    valid = True
    for name, value in (("port_range_min", low), ("port_range_max", high)):
        if not 1 <= value <= _MAX_PORT:
            violations.add(f"{_FIELD}.{name}", f"a port is 1-{_MAX_PORT} (0 and 0: every port)")
            valid = False
    if valid and low > high:
        violations.add(f"{_FIELD}.port_range_min", "must not be above port_range_max")


def _remote_prefix(violations: errors.ViolationCollector, rule: Rule) -> str:
    if not rule.remote_ip_prefix:
        return ""
    field = f"{_FIELD}.remote_ip_prefix"
    try:
        network = ipaddress.ip_network(rule.remote_ip_prefix, strict=False)
    except ValueError:
        violations.add(field, "must be a CIDR such as 10.0.0.0/24")
        return rule.remote_ip_prefix
    wanted = 6 if rule.ether_type == Rule.ETHER_TYPE_IPV6 else 4
    if network.version != wanted:
        violations.add(field, f"must be an IPv{wanted} CIDR for ether_type IPv{wanted}")
    return str(network)


def normalized(rule: Rule) -> Rule:
    """The rule as stored (protocol by name, family set, CIDR normalized), or INVALID_ARGUMENT."""
    violations = errors.ViolationCollector()
    clean = Rule()
    clean.CopyFrom(rule)
    _check_fixed(violations, rule)
    clean.ether_type = rule.ether_type or Rule.ETHER_TYPE_IPV4
    clean.protocol = _protocol(violations, clean)
    if clean.protocol == "icmpv6" and clean.ether_type == Rule.ETHER_TYPE_IPV4:
        violations.add(f"{_FIELD}.protocol", "icmpv6 needs ether_type IPv6")
    _port_range(violations, clean.protocol, rule.port_range_min, rule.port_range_max)
    if clean.protocol in _ICMP and (rule.port_range_min, rule.port_range_max) == (0, 0):
        clean.port_range_min = clean.port_range_max = -1
    clean.remote_ip_prefix = _remote_prefix(violations, clean)
    if rule.remote_group_id:
        if rule.remote_ip_prefix:
            violations.add(f"{_FIELD}.remote_group_id", "exclusive with remote_ip_prefix")
        elif not resources.is_uuid(rule.remote_group_id):
            violations.add(f"{_FIELD}.remote_group_id", "must be a UUID")
    violations.check("invalid security group rule")
    return clean


def _check_fixed(violations: errors.ViolationCollector, rule: Rule) -> None:
    """The group, direction, family and description: checked as sent."""
    if not rule.security_group_id:
        violations.add(f"{_FIELD}.security_group_id", "required")
    elif not resources.is_uuid(rule.security_group_id):
        violations.add(f"{_FIELD}.security_group_id", "must be a UUID")
    if rule.direction not in (Rule.DIRECTION_INGRESS, Rule.DIRECTION_EGRESS):
        violations.add(f"{_FIELD}.direction", "DIRECTION_INGRESS or DIRECTION_EGRESS")
    if rule.ether_type not in (Rule.ETHER_TYPE_UNSPECIFIED, Rule.ETHER_TYPE_IPV4,
                               Rule.ETHER_TYPE_IPV6):
        violations.add(f"{_FIELD}.ether_type", "ETHER_TYPE_IPV4 or ETHER_TYPE_IPV6")
    if len(rule.meta.description) > 255:
        violations.add(f"{_FIELD}.meta.description", "at most 255 characters")


def _same(one: Rule, other: Rule) -> bool:
    fields = ("direction", "ether_type", "protocol", "port_range_min", "port_range_max",
              "remote_ip_prefix", "remote_group_id")
    return all(getattr(one, name) == getattr(other, name) for name in fields)


async def _check_remote(txn: Txn, rule: Rule, project_id: str) -> None:
    """A remote group must be a group of the rule's own project (the same group is fine)."""
    if not rule.remote_group_id or rule.remote_group_id == rule.security_group_id:
        return
    found = await txn.get(keys.security_group(rule.remote_group_id), security_group.SecurityGroup)
    if found is None or found.value.meta.project_id != project_id:
        field = f"{_FIELD}.remote_group_id"
        raise errors.InvalidArgument(
            "remote_group_id names no security group of the rule's project",
            violations=[errors.FieldViolation(field, "no security group of this project")])
    if found.value.state == security_group.SecurityGroup.DELETING:
        raise errors.FailedPrecondition(
            f"security group {rule.remote_group_id} is being deleted",
            reason="nubis.security_group.deleting", metadata={"id": rule.remote_group_id})


async def create(store: Store, sender: TaskSender, principal: Principal,
                 request: security_group_pb2.CreateSecurityGroupRuleRequest) -> Rule:
    """Add a rule to a group of the caller's project; an equal rule is ALREADY_EXISTS.

    Once committed, every bound port of the group gets its new filter.
    """
    rule = normalized(request.security_group_rule)
    group_id = rule.security_group_id
    idempotency = requests.prepare(store, principal.project_id, CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)
    rule.meta.CopyFrom(resources.fresh_meta(rule.meta))
    rule.state = Rule.ACTIVE

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        found = await security_group.current(txn, principal, group_id)
        group = security_group.with_revision(found)
        if group.state == security_group.SecurityGroup.DELETING:
            raise errors.FailedPrecondition(f"security group {group_id} is being deleted",
                                            reason="nubis.security_group.deleting",
                                            metadata={"id": group_id})
        rule.meta.project_id = group.meta.project_id
        await _check_remote(txn, rule, group.meta.project_id)
        twin = next((other for other in group.rules if _same(other, rule)), None)
        if twin is not None:
            raise errors.AlreadyExists(
                f"security group {group_id} already has this rule ({twin.meta.id})",
                reason=DUPLICATE, metadata={"id": twin.meta.id})
        if request.validate_only:
            return ""
        await quota.reserve(txn, group.meta.project_id, {"security_group_rules": 1})
        group.rules.append(rule)
        group.meta.update_time.CopyFrom(rule.meta.create_time)
        security_group.write_group(txn, group, rules=False)
        txn.put(keys.security_group_rule(rule.meta.id), rule)
        await requests.remember(txn, idempotency, rule.meta.id)
        return rule.meta.id

    rule_id = await store.atomic(body)
    if not rule_id:
        rule.meta.ClearField("id")
        return rule
    await port_filter.refresh(store, sender, rules_of=[group_id])
    return await get(store, principal, rule_id)


def _with_revision(item: Versioned[Rule]) -> Rule:
    rule = Rule()
    rule.CopyFrom(item.value)
    rule.meta.revision = item.mod_revision
    return rule


async def get(store: Store, principal: Principal, rule_id: str) -> Rule:
    resources.check_id(rule_id)
    found = await store.find(keys.security_group_rule(rule_id), Rule)
    if found is None or not policy.visible(principal, found.value.meta.project_id):
        raise errors.NotFound(f"security group rule {rule_id} not found",
                              metadata={"id": rule_id})
    return _with_revision(found)


def _matcher(text: str, admin: bool) -> filtering.Filter:
    known: dict[str, frozenset[str] | None] = {
        "security_group_id": None, "protocol": None, "remote_group_id": None,
        "direction": frozenset(filtering.enum_names(Rule.Direction.DESCRIPTOR)),
        "ether_type": frozenset(filtering.enum_names(Rule.EtherType.DESCRIPTOR)),
    }
    if admin:
        known["project_id"] = None
    return filtering.parse(text, known, labels=False)


def _fields(rule: Rule) -> dict[str, str]:
    return {
        "security_group_id": rule.security_group_id, "protocol": rule.protocol or "any",
        "remote_group_id": rule.remote_group_id, "project_id": rule.meta.project_id,
        "direction": filtering.enum_name(Rule.Direction.DESCRIPTOR, rule.direction),
        "ether_type": filtering.enum_name(Rule.EtherType.DESCRIPTOR, rule.ether_type),
    }


async def list_rules(
    store: Store, principal: Principal,
    request: security_group_pb2.ListSecurityGroupRulesRequest,
) -> tuple[list[Rule], str]:
    """Rules of the caller's project's groups (every project's for all_projects), by id."""
    size = pages.page_size(request.page_size)
    scope = policy.list_scope(principal, all_projects=request.all_projects)
    chosen = _matcher(request.filter, policy.is_cloud_admin(principal))
    if scope is not None:
        await security_group.ensure_default(store, scope)

    def keep(item: Versioned[Rule]) -> bool:
        rule = item.value
        return (scope is None or rule.meta.project_id == scope) and chosen.matches(_fields(rule))

    found, next_token = await pages.filtered_page(
        store, keys.SECURITY_GROUP_RULES, Rule, keep, size=size, page_token=request.page_token)
    return [_with_revision(item) for item in found], next_token


async def delete(store: Store, sender: TaskSender, principal: Principal, rule_id: str,
                 revision: int = 0) -> None:
    """Remove a rule from its group; then every bound port of the group gets its new filter."""
    resources.check_id(rule_id)

    async def body(txn: Txn) -> str:
        found = await txn.get(keys.security_group_rule(rule_id), Rule)
        if found is None or not policy.visible(principal, found.value.meta.project_id):
            raise errors.NotFound(f"security group rule {rule_id} not found",
                                  metadata={"id": rule_id})
        security_group.check_revision(revision, found.mod_revision)
        group_found = await security_group.current(txn, principal,
                                                   found.value.security_group_id)
        group = security_group.with_revision(group_found)
        before = security_group.counted(group)["security_group_rules"]
        kept = [rule for rule in group.rules if rule.meta.id != rule_id]
        del group.rules[:]
        group.rules.extend(kept)
        freed = before - security_group.counted(group)["security_group_rules"]
        group.meta.update_time.CopyFrom(resources.now())
        security_group.write_group(txn, group, rules=False)
        txn.delete(keys.security_group_rule(rule_id))
        if freed:
            await quota.release(txn, group.meta.project_id, {"security_group_rules": freed})
        return group.meta.id

    group_id = await store.atomic(body)
    await port_filter.refresh(store, sender, rules_of=[group_id])

