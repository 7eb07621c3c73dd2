"""Security groups and their rules: the allow-lists realized as nwfilters on ports.

A group is ``network/security-groups/<id>`` and carries its rules; each rule
is also ``network/security-group-rules/<id>`` (Get/List by rule id), written
in the same transaction as the group, so a rule change always moves the
group's revision. A group's name is unique in its project
(``network/security-group-names/<project>/<name>``).

Every project has one group named "default" (all egress; ingress only from
members of the same group), made on first need by `ensure_default`. Its id
is derived from the project id, so racing replicas all write the same key and
exactly one commit makes it.

Ports name their groups (D's CreatePort calls `check_usable`, or
`check_usable_in` inside its own transaction so that a group deleted meanwhile
makes the port's commit run again and fail).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

from nubis.common.v1 import resource_pb2
from nubis.network.v1 import security_group_pb2

from services.common import errors, resources
from services.common.store import Store, Txn, Versioned
from services.network import keys

SecurityGroup = security_group_pb2.SecurityGroup
Rule = security_group_pb2.SecurityGroupRule

DEFAULT_NAME = "default"
# Default groups get a name-based UUID of their project under this namespace.
_DEFAULT_NAMESPACE = uuid.UUID("4f0d2a7e-9b1c-5d3e-8a6f-2c7b9e1d0a53")

Reader = Callable[[str, type[SecurityGroup]], Awaitable[Versioned[SecurityGroup] | None]]


def default_group_id(project_id: str) -> str:
    """The id of `project_id`'s default group (the same on every replica)."""
    return str(uuid.uuid5(_DEFAULT_NAMESPACE, project_id))


def with_revision(item: Versioned[SecurityGroup]) -> SecurityGroup:
    group = SecurityGroup()
    group.CopyFrom(item.value)
    group.meta.revision = item.mod_revision
    return group


def _rule(group: SecurityGroup, direction: Rule.Direction.ValueType,
          ether_type: Rule.EtherType.ValueType, remote_group_id: str = "") -> Rule:
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(), group.meta.project_id)
    return Rule(meta=meta, state=Rule.ACTIVE, security_group_id=group.meta.id,
                direction=direction, ether_type=ether_type, remote_group_id=remote_group_id)


def default_egress_rules(group: SecurityGroup) -> list[Rule]:
    """Allow all egress, IPv4 and IPv6 (what every new group starts with, as in Neutron)."""
    return [_rule(group, Rule.DIRECTION_EGRESS, family)
            for family in (Rule.ETHER_TYPE_IPV4, Rule.ETHER_TYPE_IPV6)]


def _default_group(project_id: str) -> SecurityGroup:
    meta = resource_pb2.ResourceMeta(
        name=DEFAULT_NAME, description="Default security group")
    group = SecurityGroup(meta=resources.fresh_meta(meta, project_id),
                          state=SecurityGroup.ACTIVE, stateful=True)
    group.meta.id = default_group_id(project_id)
    group.rules.extend(default_egress_rules(group))
    group.rules.extend(
        _rule(group, Rule.DIRECTION_INGRESS, family, remote_group_id=group.meta.id)
        for family in (Rule.ETHER_TYPE_IPV4, Rule.ETHER_TYPE_IPV6))
    return group


def write_group(txn: Txn, group: SecurityGroup) -> None:
    """Put the group and each of its rules' own records."""
    stored = SecurityGroup()
    stored.CopyFrom(group)
    stored.meta.revision = 0
    txn.put(keys.security_group(group.meta.id), stored)
    for rule in stored.rules:
        txn.put(keys.security_group_rule(rule.meta.id), rule)


async def ensure_default(store: Store, project_id: str) -> SecurityGroup:
    """The project's default group, created if absent (racing callers make exactly one).

    The default group counts against no quota: the service makes it on the
    project's behalf, and a project that filled its security_groups quota
    must still be able to make ports.
    """
    key = keys.security_group(default_group_id(project_id))
    found = await store.find(key, SecurityGroup)
    if found is not None:
        return with_revision(found)

    async def body(txn: Txn) -> None:
        if await txn.get(key, SecurityGroup) is not None:
            return  # a racing caller made it; this run writes nothing
        # Puts, not creates: the absent read above already makes the commit
        # require the key to be free, and a lost race re-runs this body.
        group = _default_group(project_id)
        write_group(txn, group)
        txn.put(keys.security_group_name(project_id, DEFAULT_NAME),
                resource_pb2.ResourceMeta(id=group.meta.id, project_id=project_id))

    await store.atomic(body)
    return with_revision(await store.get(key, SecurityGroup))


async def _resolve(store: Store, project_id: str, id_or_name: str) -> str:
    """A group id from an id or a name of the project ("default" is made if missing)."""
    if resources.is_uuid(id_or_name):
        return id_or_name
    if id_or_name == DEFAULT_NAME:
        return (await ensure_default(store, project_id)).meta.id
    if resources.is_name(id_or_name):
        index = await store.find(keys.security_group_name(project_id, id_or_name),
                                 resource_pb2.ResourceMeta)
        if index is not None:
            return index.value.id
    raise errors.NotFound(f"security group {id_or_name} not found",
                          metadata={"id": id_or_name})


def _usable(item: Versioned[SecurityGroup] | None, project_id: str, group_id: str,
            field: str) -> None:
    if item is None or item.value.meta.project_id != project_id:
        # Another project's group is as unknown to the caller as a missing one.
        raise errors.NotFound(f"security group {group_id} not found",
                              metadata={"id": group_id, "field": field})


async def check_usable(store: Store, project_id: str, group_ids: Sequence[str], *,
                       field: str = "security_group_ids") -> list[str]:
    """The ids of `group_ids` (ids or names of the project's groups), each once, in order.

    NOT_FOUND for a group that is missing or belongs to another project. Read
    outside any transaction: to hold the groups in a port's commit, call
    `check_usable_in` with the ids this returns.
    """
    chosen: list[str] = []
    for index, id_or_name in enumerate(group_ids):
        if not id_or_name:
            raise errors.InvalidArgument(
                f"{field}[{index}] is empty",
                violations=[errors.FieldViolation(f"{field}[{index}]", "must not be empty")])
        group_id = await _resolve(store, project_id, id_or_name)
        if group_id not in chosen:
            chosen.append(group_id)
    await _check_all(store.find, project_id, chosen, field)
    return chosen


async def check_usable_in(txn: Txn, project_id: str, group_ids: Sequence[str], *,
                          field: str = "security_group_ids") -> None:
    """`check_usable` of resolved ids inside `txn`: its commit then needs them unchanged.

    A group deleted (or given a rule) after this read makes the commit run its
    body again on the fresh values, which then finds the group gone.
    """
    await _check_all(txn.get, project_id, group_ids, field)


async def _check_all(read: Reader, project_id: str, group_ids: Sequence[str],
                     field: str) -> None:
    for group_id in group_ids:
        resources.check_id(group_id, field)
        _usable(await read(keys.security_group(group_id), SecurityGroup), project_id,
                group_id, field)
