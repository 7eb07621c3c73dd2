"""Security groups: named allow-lists of traffic, realized as nwfilters on ports.

A group is ``network/security-groups/<id>`` and carries its rules (rules are
in ``security_group_rule``; each also has its own record, written in the same
transaction, so a rule change always moves the group's revision). A group's
name is unique in its project (``network/security-group-names/<project>/<name>``).

Every project has one group named "default" (all egress; ingress only from
members of the same group), made on first need by `ensure_default`. Its id,
and its first rules' ids, are derived from the project id, so racing replicas
all write the same keys and exactly one commit makes it. It counts against no
quota, can't be renamed, and only a cloud-admin may delete it (a project's
clean-up), once no port uses it.

Ports name their groups: CreatePort calls `check_usable` and then, inside its
own transaction, `check_usable_in`, so a group deleted meanwhile makes the
port's commit run again and fail. Delete marks the group DELETING first (its
revision moves, failing such racing commits), then looks for ports and groups
still using it, and only then deletes it, comparing the marked revision.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence

from nubis.common.v1 import resource_pb2
from nubis.network.v1 import network_service_pb2, port_pb2, security_group_pb2

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.network import keys

SecurityGroup = security_group_pb2.SecurityGroup
Rule = security_group_pb2.SecurityGroupRule

DEFAULT_NAME = "default"
UPDATABLE = ("name", "description", "labels")
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateSecurityGroup")
PAGE_LISTING = "security-groups"
IN_USE = "nubis.security_group.in_use"
DEFAULT_GROUP = "nubis.security_group.default"
NAME_TAKEN = "nubis.security_group.name_taken"
# Default groups (and their first rules) get name-based UUIDs of their project.
_DEFAULT_NAMESPACE = uuid.UUID("4f0d2a7e-9b1c-5d3e-8a6f-2c7b9e1d0a53")
_DEFAULT_RULES = 4

Reader = Callable[[str, type[SecurityGroup]], Awaitable[Versioned[SecurityGroup] | None]]


@functools.lru_cache(maxsize=4096)
def default_group_id(project_id: str) -> str:
    """The id of `project_id`'s default group (the same on every replica)."""
    return str(uuid.uuid5(_DEFAULT_NAMESPACE, project_id))


def _builtin_rule_ids(project_id: str) -> list[str]:
    return [str(uuid.uuid5(_DEFAULT_NAMESPACE, f"{project_id}/rule/{n}"))
            for n in range(_DEFAULT_RULES)]


def is_default(group: SecurityGroup) -> bool:
    return group.meta.id == default_group_id(group.meta.project_id)


def with_revision(item: Versioned[SecurityGroup]) -> SecurityGroup:
    group = SecurityGroup()
    group.CopyFrom(item.value)
    group.meta.revision = item.mod_revision
    for rule in group.rules:
        rule.meta.revision = item.mod_revision
    return group


def counted(group: SecurityGroup) -> dict[str, int]:
    """What the group holds of its project's quota (the default group and its first rules: none)."""
    builtin = set(_builtin_rule_ids(group.meta.project_id)) if is_default(group) else set()
    return {"security_groups": 0 if is_default(group) else 1,
            "security_group_rules": sum(rule.meta.id not in builtin for rule in group.rules)}


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
    meta = resource_pb2.ResourceMeta(name=DEFAULT_NAME, description="Default security group")
    group = SecurityGroup(meta=resources.fresh_meta(meta, project_id),
                          state=SecurityGroup.ACTIVE, stateful=True)
    group.meta.id = default_group_id(project_id)
    group.rules.extend(default_egress_rules(group))
    group.rules.extend(
        _rule(group, Rule.DIRECTION_INGRESS, family, remote_group_id=group.meta.id)
        for family in (Rule.ETHER_TYPE_IPV4, Rule.ETHER_TYPE_IPV6))
    for rule, rule_id in zip(group.rules, _builtin_rule_ids(project_id), strict=True):
        rule.meta.id = rule_id
    return group


def write_group(txn: Txn, group: SecurityGroup, *, rules: bool = True) -> None:
    """Put the group (and, with `rules`, each of its rules' own records)."""
    stored = SecurityGroup()
    stored.CopyFrom(group)
    stored.meta.revision = 0
    for rule in stored.rules:
        rule.meta.revision = 0
    txn.put(keys.security_group(group.meta.id), stored)
    if rules:
        for rule in stored.rules:
            txn.put(keys.security_group_rule(rule.meta.id), rule)


def _name_index(group: SecurityGroup) -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(id=group.meta.id, project_id=group.meta.project_id)


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
        txn.put(keys.security_group_name(project_id, DEFAULT_NAME), _name_index(group))

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
    if item.value.state == SecurityGroup.DELETING:
        raise errors.FailedPrecondition(f"security group {group_id} is being deleted",
                                        reason="nubis.security_group.deleting",
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


# --- the API ------------------------------------------------------------------


def _validate(group: SecurityGroup, fields: Sequence[str] = UPDATABLE) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields:
        resources.check_name(violations, "security_group.meta.name", group.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "security_group.meta.labels", dict(group.meta.labels))
    if "description" in fields and len(group.meta.description) > 1024:
        violations.add("security_group.meta.description", "at most 1024 characters")
    violations.check("invalid security group")


def _reserved_name(name: str) -> errors.AlreadyExists:
    return errors.AlreadyExists(
        f"security group name {name!r} is taken", reason=NAME_TAKEN, metadata={"name": name})


async def create(store: Store, principal: Principal,
                 request: security_group_pb2.CreateSecurityGroupRequest) -> SecurityGroup:
    """A new group of the caller's project with the two allow-all-egress rules (unless skipped).

    Counts one security group and its rules against the project's quota, in
    the same transaction. Idempotent under request_id.
    """
    wanted = request.security_group
    _validate(wanted)
    if wanted.meta.project_id:
        resources.check_id(wanted.meta.project_id, "security_group.meta.project_id")
    project_id = policy.target_project(principal, wanted.meta.project_id, "project")
    if wanted.meta.name == DEFAULT_NAME:
        raise _reserved_name(DEFAULT_NAME)
    group = SecurityGroup(meta=resources.fresh_meta(wanted.meta, project_id),
                          state=SecurityGroup.ACTIVE,
                          stateful=wanted.stateful if wanted.HasField("stateful") else True)
    if not request.skip_default_rules:
        group.rules.extend(default_egress_rules(group))
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    await ensure_default(store, project_id)  # Neutron makes it on a project's first use

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        name_key = keys.security_group_name(project_id, group.meta.name)
        if await txn.get(name_key, resource_pb2.ResourceMeta) is not None:
            raise _reserved_name(group.meta.name)
        if request.validate_only:
            return ""
        await quota.reserve(txn, project_id, counted(group))
        write_group(txn, group)
        txn.put(name_key, _name_index(group))
        await requests.remember(txn, idempotency, group.meta.id)
        return group.meta.id

    group_id = await store.atomic(body)
    if not group_id:
        group.meta.ClearField("id")
        return group
    return await get(store, principal, group_id)


async def get(store: Store, principal: Principal, id_or_name: str) -> SecurityGroup:
    """A group by id, or by name in the caller's project; NOT_FOUND for other projects'."""
    if not id_or_name:
        resources.check_id(id_or_name)
    group_id = await _resolve(store, principal.project_id, id_or_name)
    found = await store.find(keys.security_group(group_id), SecurityGroup)
    if found is None:
        raise errors.NotFound(f"security group {id_or_name} not found",
                              metadata={"id": id_or_name})
    policy.require_visible(principal, found.value.meta.project_id, "security group", group_id)
    return with_revision(found)


def _matcher(text: str, admin: bool) -> filtering.Filter:
    known: dict[str, frozenset[str] | None] = {"name": None, "state": frozenset(
        filtering.enum_names(SecurityGroup.State.DESCRIPTOR))}
    if admin:
        known["project_id"] = None
    return filtering.parse(text, known)


def _fields(group: SecurityGroup) -> dict[str, str]:
    return {"name": group.meta.name, "project_id": group.meta.project_id,
            "state": filtering.enum_name(SecurityGroup.State.DESCRIPTOR, group.state)}


async def list_groups(
    store: Store, principal: Principal, request: security_group_pb2.ListSecurityGroupsRequest,
) -> tuple[list[SecurityGroup], str]:
    """The caller's project's groups (default included: made here if missing), by id."""
    size = pages.page_size(request.page_size)
    service = policy.is_service(principal)
    scope = None if service and request.all_projects else policy.list_scope(
        principal, all_projects=request.all_projects)  # a service names its project_id
    chosen = _matcher(request.filter, policy.is_cloud_admin(principal) or service)
    if scope is not None:
        await ensure_default(store, scope)

    def keep(item: Versioned[SecurityGroup]) -> bool:
        group = item.value
        return (scope is None or group.meta.project_id == scope) and chosen.matches(
            _fields(group), group.meta.labels)

    found, next_token = await pages.filtered_page(
        store, keys.SECURITY_GROUPS, SecurityGroup, keep, size=size, page_token=request.page_token)
    return [with_revision(item) for item in found], next_token


def check_revision(expected: int, actual: int) -> None:
    if expected and expected != actual:
        raise errors.Conflict(
            "the record changed since it was read", reason="nubis.conflict",
            metadata={"expected_revision": str(expected), "revision": str(actual)})


async def current(txn: Txn, principal: Principal, group_id: str) -> Versioned[SecurityGroup]:
    """The group as `txn` reads it, NOT_FOUND if missing or not the caller's."""
    found = await txn.get(keys.security_group(group_id), SecurityGroup)
    if found is None or not policy.visible(principal, found.value.meta.project_id):
        raise errors.NotFound(f"security group {group_id} not found", metadata={"id": group_id})
    return found


async def update(store: Store, principal: Principal, wanted: SecurityGroup,
                 mask: Sequence[str]) -> SecurityGroup:
    """Change name, description or labels; the default group keeps its name."""
    group_id = resources.check_id(wanted.meta.id, "security_group.meta.id")
    fields = resources.check_mask(mask, UPDATABLE)
    _validate(wanted, fields)

    async def body(txn: Txn) -> None:
        found = await current(txn, principal, group_id)
        check_revision(wanted.meta.revision, found.mod_revision)
        group = with_revision(found)
        if "name" in fields and wanted.meta.name != group.meta.name:
            if is_default(group):
                raise errors.FailedPrecondition(
                    "the default security group can't be renamed", reason=DEFAULT_GROUP,
                    metadata={"id": group_id})
            await _rename(txn, group, wanted.meta.name)
        if "description" in fields:
            group.meta.description = wanted.meta.description
        if "labels" in fields:
            group.meta.labels.clear()
            group.meta.labels.update(wanted.meta.labels)
        group.meta.update_time.CopyFrom(resources.now())
        write_group(txn, group, rules=False)

    await store.atomic(body)
    return await get(store, principal, group_id)


async def _rename(txn: Txn, group: SecurityGroup, new_name: str) -> None:
    new_key = keys.security_group_name(group.meta.project_id, new_name)
    if new_name == DEFAULT_NAME or await txn.get(new_key, resource_pb2.ResourceMeta):
        raise _reserved_name(new_name)
    txn.delete(keys.security_group_name(group.meta.project_id, group.meta.name))
    txn.put(new_key, _name_index(group))
    group.meta.name = new_name


async def _set_state(store: Store, principal: Principal, group_id: str, revision: int,
                     state: SecurityGroup.State.ValueType) -> int:
    async def body(txn: Txn) -> int:
        found = await current(txn, principal, group_id)
        check_revision(revision, found.mod_revision)
        if found.value.state == state:
            return found.mod_revision
        group = with_revision(found)
        group.state = state
        write_group(txn, group, rules=False)
        return 0

    seen = await store.atomic(body)
    return seen or (await store.get(keys.security_group(group_id), SecurityGroup)).mod_revision


async def _users(store: Store, group: SecurityGroup) -> tuple[list[str], list[str]]:
    """Ports naming the group, and other groups whose rules name it as their remote."""
    ports, _ = await store.list_all(keys.PORTS, port_pb2.Port)
    groups, _ = await store.list_all(keys.SECURITY_GROUPS, SecurityGroup)
    port_ids = [item.value.meta.id for item in ports
                if group.meta.id in item.value.security_group_ids]
    group_ids = [item.value.meta.id for item in groups
                 if item.value.meta.id != group.meta.id
                 and any(rule.remote_group_id == group.meta.id for rule in item.value.rules)]
    return port_ids, group_ids


async def delete(store: Store, principal: Principal, group_id: str, revision: int = 0) -> None:
    """Delete a group no port uses and no other group's rule names.

    The default group can't be deleted by the project (as in Neutron); a
    cloud-admin may, once nothing uses it. The group is marked DELETING first,
    so a port taking it up concurrently either is seen by the check below or
    fails its own commit.
    """
    resources.check_id(group_id)
    group = await get(store, principal, group_id)
    if is_default(group) and not policy.is_cloud_admin(principal):
        raise errors.FailedPrecondition(
            "the default security group can't be deleted", reason=DEFAULT_GROUP,
            metadata={"id": group_id})
    marked = await _set_state(store, principal, group_id, revision, SecurityGroup.DELETING)
    port_ids, group_ids = await _users(store, group)
    if port_ids or group_ids:
        await _set_state(store, principal, group_id, marked, SecurityGroup.ACTIVE)
        what = (f"{len(port_ids)} port(s)" if port_ids else
                f"the rules of security group(s) {', '.join(group_ids)}")
        raise errors.FailedPrecondition(
            f"security group {group_id} is in use by {what}", reason=IN_USE,
            metadata={"id": group_id, "ports": str(len(port_ids)),
                      "port_ids": ",".join(port_ids[:10]), "group_ids": ",".join(group_ids)})

    async def body(txn: Txn) -> None:
        found = await current(txn, principal, group_id)
        check_revision(marked, found.mod_revision)
        txn.delete(keys.security_group(group_id))
        txn.delete(keys.security_group_name(found.value.meta.project_id, found.value.meta.name))
        for rule in found.value.rules:
            txn.delete(keys.security_group_rule(rule.meta.id))
        await quota.release(txn, found.value.meta.project_id, counted(found.value))

    await store.atomic(body)
