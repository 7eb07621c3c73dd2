"""Ports: a NIC's place on a network, with its MAC, fixed IPs and security groups.

A port is created in one transaction with everything it holds: its fixed IPs
and MAC (create-if-absent keys, see `ipam`), its entry in the network's port
index, its request_id record and its `ports` quota. Deleting it frees them
all in one transaction too. A port on another project's network that is not
shared is NOT_FOUND, as the network itself is.

Every port create of a project changes that project's quota usage record;
a create takes the project's turn (`port_turns.Turns`) for the last stretch
of its transaction (reading the usage, then the commit); what comes before —
the network, subnets, addresses (`port_addresses`), MAC — runs concurrently.
"""

from __future__ import annotations

import asyncio

from google.protobuf import message
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    ipam_pb2,
    network_pb2,
    network_service_pb2,
    port_pb2,
    security_group_pb2,
)

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.settings import NetworkSettings
from services.common.store import Store, Txn, Versioned
from services.network import binding, ipam, keys, security_group, validation
from services.network import network as network_module
from services.network.port_addresses import hold_addresses
from services.network.port_turns import Creation, Turns

__all__ = ["Creation", "Turns", "hold_addresses"]

Port = port_pb2.Port
UPDATABLE = ("name", "description", "labels", "security_group_ids", "port_security_enabled",
             "admin_state_up", "allowed_address_pairs", "device_id", "device_owner")
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService", "CreatePort")
_STATES = Port.State.DESCRIPTOR
# device_owner values of ports the network service itself makes (routers, floating IPs).
INTERNAL_OWNERS = frozenset({"network:router_interface", "network:router_gateway",
                             "network:floating_ip", "network:dhcp"})
IN_USE = "nubis.port.in_use"
# Seconds a create keeps running its transaction again while others win the commit.
COMMIT_PATIENCE = 30.0
_MAX_FIXED_IPS = 8
_MAX_PAIRS = 10


def not_found(port_id: str) -> errors.NotFound:
    return errors.NotFound(f"port {port_id} not found", metadata={"port_id": port_id})


def with_revision(item: Versioned[Port]) -> Port:
    found = Port()
    found.CopyFrom(item.value)
    found.meta.revision = item.mod_revision
    return found


def visible(principal: Principal | None, found: Port) -> bool:
    if network_module.is_admin(principal):
        return True
    assert principal is not None
    return found.meta.project_id == principal.project_id


async def fetch(store: Store, port_id: str) -> Port:
    resources.check_id(port_id, "id")
    found = await store.find(keys.port(port_id), Port)
    if found is None:
        raise not_found(port_id)
    return with_revision(found)


async def get(store: Store, principal: Principal | None, port_id: str) -> Port:
    found = await fetch(store, port_id)
    if not visible(principal, found):
        raise not_found(port_id)
    return found


def _check_owner(violations: errors.ViolationCollector, given: Port,
                 principal: Principal | None, fields: tuple[str, ...]) -> None:
    if "device_owner" in fields:
        if len(given.device_owner) > 255:
            violations.add("port.device_owner", "at most 255 characters")
        elif given.device_owner.startswith("network:") and not network_module.is_admin(
                principal):
            violations.add("port.device_owner", "network:* owners are the network service's")
    if "device_id" in fields and len(given.device_id) > 255:
        violations.add("port.device_id", "at most 255 characters")


def _check_pairs(violations: errors.ViolationCollector, given: Port) -> None:
    if len(given.allowed_address_pairs) > _MAX_PAIRS:
        violations.add("port.allowed_address_pairs", f"at most {_MAX_PAIRS}")
    for index, pair in enumerate(given.allowed_address_pairs):
        where = f"port.allowed_address_pairs[{index}]"
        validation.check_address_or_cidr(violations, f"{where}.ip_address", pair.ip_address)
        if pair.mac_address:
            validation.check_mac(violations, f"{where}.mac_address", pair.mac_address)


def _validate(given: Port, principal: Principal | None, fields: tuple[str, ...]) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields and given.meta.name:
        resources.check_name(violations, "port.meta.name", given.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "port.meta.labels", dict(given.meta.labels))
    if "description" in fields and len(given.meta.description) > 1024:
        violations.add("port.meta.description", "at most 1024 characters")
    _check_owner(violations, given, principal, fields)
    if "allowed_address_pairs" in fields:
        _check_pairs(violations, given)
    violations.check("invalid port")


def validate_new(given: Port, principal: Principal | None) -> None:
    violations = errors.ViolationCollector()
    if not given.network_id:
        violations.add("port.network_id", "required")
    elif not resources.is_uuid(given.network_id):
        violations.add("port.network_id", "must be a UUID")
    if given.mac_address:
        validation.check_mac(violations, "port.mac_address", given.mac_address)
    if len(given.fixed_ips) > _MAX_FIXED_IPS:
        violations.add("port.fixed_ips", f"at most {_MAX_FIXED_IPS}")
    for index, fixed in enumerate(given.fixed_ips):
        where = f"port.fixed_ips[{index}]"
        if not fixed.subnet_id and not fixed.ip_address:
            violations.add(where, "name a subnet_id, an ip_address or both")
        if fixed.subnet_id and not resources.is_uuid(fixed.subnet_id):
            violations.add(f"{where}.subnet_id", "must be a UUID")
        if fixed.ip_address:
            validation.parse_address(violations, f"{where}.ip_address", fixed.ip_address)
    violations.check("invalid port")
    _validate(given, principal, UPDATABLE)


def new_port(given: Port, project_id: str, groups: list[str]) -> Port:
    made = Port(
        meta=resources.fresh_meta(given.meta, project_id), state=Port.DOWN,
        network_id=given.network_id, device_id=given.device_id,
        device_owner=given.device_owner,
        port_security_enabled=given.port_security_enabled
        if given.HasField("port_security_enabled") else True,
        admin_state_up=given.admin_state_up if given.HasField("admin_state_up") else True,
    )
    for pair in given.allowed_address_pairs:
        made.allowed_address_pairs.add(ip_address=pair.ip_address,
                                       mac_address=validation.normal_mac(pair.mac_address))
    if made.port_security_enabled:
        made.security_group_ids.extend(groups)
    return made


async def groups_of(store: Store, turns: Turns, project_id: str, given: Port) -> list[str]:
    """The port's groups: those named (checked), else the project's default group."""
    if given.HasField("port_security_enabled") and not given.port_security_enabled:
        if given.security_group_ids:
            raise errors.InvalidArgument(
                "a port without port security has no security groups",
                violations=[errors.FieldViolation(
                    "port.security_group_ids", "must be empty when port_security_enabled "
                    "is false")])
        return []
    if given.device_owner in INTERNAL_OWNERS:
        return []
    if given.security_group_ids:
        return await security_group.check_usable(store, project_id, given.security_group_ids,
                                                 field="port.security_group_ids")
    if project_id not in turns.defaults_known:
        await security_group.ensure_default(store, project_id)
        turns.defaults_known.add(project_id)
    # Checked again in the create's transaction, like any named group.
    return [security_group.default_group_id(project_id)]


async def create(creation: Creation, request: port_pb2.CreatePortRequest) -> Port:
    """A DOWN port with its MAC and fixed IPs allocated, counted in the `ports` quota."""
    given = request.port
    validate_new(given, creation.principal)
    project_id = creation.project_id
    groups = await groups_of(creation.store, creation.turns, project_id, given)
    idempotency = requests.prepare(creation.store, project_id, CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)
    made = new_port(given, project_id, groups)
    made_id, revision = await _commit_new(creation, made, given, idempotency,
                                          validate_only=request.validate_only)
    if request.validate_only:
        made.meta.id = ""
        return made
    if made_id != made.meta.id or not revision:
        return await fetch(creation.store, made_id)  # a replayed request: the earlier port
    made.meta.revision = revision
    return made


async def _commit_new(creation: Creation, made: Port, given: Port,
                      idempotency: requests.Idempotency | None, *,
                      validate_only: bool = False) -> tuple[str, int]:
    """Commit the port; its id (an earlier one's, for a replayed request) and revision."""
    store = creation.store
    turns = creation.turns
    project_id = made.meta.project_id
    last: list[Txn] = []
    reserved: list[identity_pb2.Usage] = []
    tried: list[tuple[str, int]] = []
    async with turns.taking() as turn:
        async def body(txn: Txn) -> str:
            last[:] = [txn]
            reserved.clear()
            await _prefetch(txn, made, idempotency)
            earlier = await requests.replayed(txn, idempotency)
            if earlier:
                return earlier
            net = await network_module.in_txn(txn, creation.principal, made.network_id,
                                              field="port.network_id")
            if made.security_group_ids:
                await security_group.check_usable_in(txn, made.meta.project_id,
                                                     list(made.security_group_ids),
                                                     field="port.security_group_ids")
            if validate_only:
                return ""  # nothing buffered: the commit writes nothing
            await hold_addresses(txn, creation, made, given, list(net.subnet_ids), tried)
            txn.create(keys.port(made.meta.id), made)
            txn.put(keys.network_port(made.network_id, made.meta.id),
                    ipam_pb2.PortRef(port_id=made.meta.id, device_owner=made.device_owner))
            await requests.remember(txn, idempotency, made.meta.id)
            await turn.take(project_id)
            await _fresh_usage(txn, store, turns, project_id)
            reserved.append(await quota.reserve(txn, project_id, {"ports": 1}))
            return made.meta.id

        try:
            # Replicas racing on one project's usage can lose many rounds in a row.
            made_id = await store.atomic(
                body, deadline=asyncio.get_running_loop().time() + COMMIT_PATIENCE)
        except BaseException:
            turns.usage.pop(project_id, None)
            raise
        finally:
            turns.ipam_hints.done(tried)
        revision = last[0].committed_revision if last else 0
        if reserved and revision:
            turns.usage[project_id] = (reserved[0], revision)
        return made_id, revision


async def _prefetch(txn: Txn, made: Port, idempotency: requests.Idempotency | None) -> None:
    """Read at once (one round trip) what the body reads one by one: the network, the
    groups, the request record and the quota limits."""
    wanted: list[tuple[str, type[message.Message]]] = [
        (keys.network(made.network_id), network_pb2.Network),
        (quota.quota_key(made.meta.project_id), identity_pb2.Quota),
        (quota.DEFAULTS_KEY, identity_pb2.Quota),
        *((keys.security_group(group), security_group_pb2.SecurityGroup)
          for group in made.security_group_ids if resources.is_uuid(group)),
    ]
    if idempotency is not None:
        wanted.append((idempotency.key, request_pb2.RequestRecord))
    if resources.is_uuid(made.network_id):
        await txn.get_many(wanted)


async def _fresh_usage(txn: Txn, store: Store, turns: Turns, project_id: str) -> None:
    """Give `txn` the project's usage as it is now, not as of the body's first read.

    A body's reads see the revision of its first one; the usage read there
    would be as old as the wait for the turn, and the commit would lose to the
    creates that went before, every time. Once the turn is held, take what
    this replica's last commit left (no round trip), or read it afresh.
    """
    cached = turns.usage.get(project_id)
    if cached is not None:
        txn.assume(quota.usage_key(project_id, "network"), cached[0], cached[1])
        return
    found = await store.find(quota.usage_key(project_id, "network"), identity_pb2.Usage)
    txn.assume(quota.usage_key(project_id, "network"), found.value if found else None,
               found.mod_revision if found else 0)


async def create_internal(
    store: Store, settings: NetworkSettings, turns: Turns, *, network_id: str, project_id: str,
    device_owner: str, device_id: str, fixed_ips: list[port_pb2.FixedIp] | None = None,
    name: str = "",
) -> Port:
    """A port the network service makes for itself (router interface/gateway, floating IP).

    No security groups, port security off, counted in no quota; addresses as
    for any port (`fixed_ips` may name subnets and addresses).
    """
    if device_owner not in INTERNAL_OWNERS:
        raise errors.InvalidArgument(
            f"{device_owner!r} is not an internal device owner",
            violations=[errors.FieldViolation("device_owner", "a network:* owner")])
    given = Port(meta=resource_pb2.ResourceMeta(name=name), network_id=network_id,
                 device_owner=device_owner, device_id=device_id, port_security_enabled=False,
                 fixed_ips=fixed_ips or [])
    made = new_port(given, project_id, [])
    creation = Creation(store, settings, turns, None, project_id)
    tried: list[tuple[str, int]] = []

    async def body(txn: Txn) -> str:
        net = await network_module.in_txn(txn, None, network_id, field="network_id")
        await hold_addresses(txn, creation, made, given, list(net.subnet_ids), tried)
        txn.create(keys.port(made.meta.id), made)
        txn.put(keys.network_port(network_id, made.meta.id),
                ipam_pb2.PortRef(port_id=made.meta.id, device_owner=device_owner))
        return made.meta.id

    try:
        port_id = await store.atomic(body)
    finally:
        turns.ipam_hints.done(tried)
    return await fetch(store, port_id)


def port_filter(text: str, *, admin: bool) -> filtering.Filter:
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(filtering.enum_names(_STATES)), "network_id": None,
        "device_id": None, "device_owner": None, "mac_address": None, "ip_address": None,
        "subnet_id": None}
    if admin:
        keys_["project_id"] = None
        keys_["node"] = None
    return filtering.parse(text, keys_)


def matches(wanted: filtering.Filter, found: Port) -> bool:
    fields = {"name": found.meta.name, "state": filtering.enum_name(_STATES, found.state),
              "network_id": found.network_id, "device_id": found.device_id,
              "device_owner": found.device_owner, "mac_address": found.mac_address,
              "project_id": found.meta.project_id, "node": found.node}
    if not _stripped(wanted).matches(fields, found.meta.labels):
        return False
    for key, attr in (("ip_address", "ip_address"), ("subnet_id", "subnet_id")):
        values = wanted.values(key)
        if values is not None and not any(getattr(fixed, attr) in values
                                          for fixed in found.fixed_ips):
            return False
    return True


def _stripped(wanted: filtering.Filter) -> filtering.Filter:
    """The filter without the terms `matches` checks on the fixed IPs itself."""
    return filtering.Filter(tuple(term for term in wanted.terms
                                  if term.key not in ("ip_address", "subnet_id")))


def in_scope(principal: Principal | None, scope: str | None, found: Port) -> bool:
    return visible(principal, found) and (scope is None or found.meta.project_id == scope)


async def list_ports(
    store: Store, principal: Principal | None, scope: str | None, page_size: int,
    page_token: str, wanted: filtering.Filter,
) -> tuple[list[Port], str]:
    size = pages.page_size(page_size)

    def keep(item: Versioned[Port]) -> bool:
        return in_scope(principal, scope, item.value) and matches(wanted, item.value)

    found, token = await pages.filtered_page(store, keys.PORTS, Port, keep, size=size,
                                             page_token=page_token)
    return [with_revision(item) for item in found], token


async def update(store: Store, principal: Principal | None,
                 request: port_pb2.UpdatePortRequest) -> Port:
    """Change the masked fields (groups checked; no groups when port security goes off)."""
    fields = tuple(resources.check_mask(request.update_mask.paths, UPDATABLE))
    given = request.port
    _validate(given, principal, fields)
    current = await get(store, principal, given.meta.id)
    groups: list[str] | None = None
    if "security_group_ids" in fields:
        groups = await security_group.check_usable(store, current.meta.project_id,
                                                   list(given.security_group_ids),
                                                   field="port.security_group_ids")
    expected = given.meta.revision

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.port(current.meta.id), Port)
        if found is None:
            raise not_found(current.meta.id)
        if expected and found.mod_revision != expected:
            raise errors.Conflict("port changed since it was read",
                                  metadata={"port_id": current.meta.id})
        record = found.value
        _apply(record, given, fields, groups)
        if record.security_group_ids:
            await security_group.check_usable_in(txn, record.meta.project_id,
                                                 list(record.security_group_ids),
                                                 field="port.security_group_ids")
        record.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.port(record.meta.id), record)
        if "device_owner" in fields:
            txn.put(keys.network_port(record.network_id, record.meta.id), ipam_pb2.PortRef(
                port_id=record.meta.id, node=record.node, device_owner=record.device_owner))

    await store.atomic(body)
    return await fetch(store, current.meta.id)


def _apply(record: Port, given: Port, fields: tuple[str, ...], groups: list[str] | None) -> None:
    for name in fields:
        if name in ("name", "description"):
            setattr(record.meta, name, getattr(given.meta, name))
        elif name == "labels":
            record.meta.labels.clear()
            record.meta.labels.update(given.meta.labels)
        elif name == "security_group_ids":
            del record.security_group_ids[:]
            record.security_group_ids.extend(groups or [])
        elif name == "allowed_address_pairs":
            del record.allowed_address_pairs[:]
            for pair in given.allowed_address_pairs:
                record.allowed_address_pairs.add(
                    ip_address=pair.ip_address, mac_address=validation.normal_mac(pair.mac_address))
        else:
            setattr(record, name, getattr(given, name))
    if not record.port_security_enabled and record.security_group_ids:
        if "security_group_ids" in fields and groups:
            raise errors.InvalidArgument(
                "a port without port security has no security groups",
                violations=[errors.FieldViolation("port.security_group_ids",
                                                  "must be empty without port security")])
        del record.security_group_ids[:]


def _owned(found: Port) -> bool:
    owner = found.device_owner
    return owner.startswith("compute:") or owner.startswith("network:router")


async def delete(store: Store, principal: Principal | None,
                 request: port_pb2.DeletePortRequest) -> list[tuple[str, str]]:
    """Delete the port and free its addresses and MAC in one transaction.

    A port an instance or a router owns is refused unless `force`
    (cloud-admin or a nubis service). Returns the (network, node) pairs
    whose realization the delete changed (a bound port's node).
    """
    current = await get(store, principal, request.id)
    privileged = network_module.is_admin(principal) or (
        principal is not None and policy.is_service(principal))
    if request.force and not privileged:
        raise errors.PermissionDenied("force needs the cloud-admin role",
                                      reason="nubis.policy.denied", metadata={"field": "force"})
    if _owned(current) and not request.force and not privileged:
        raise errors.FailedPrecondition(
            f"port {current.meta.id} is used by {current.device_owner} {current.device_id}",
            reason=IN_USE, metadata={"port_id": current.meta.id,
                                     "device_owner": current.device_owner})

    async def body(txn: Txn) -> list[tuple[str, str]]:
        found = await txn.get(keys.port(current.meta.id), Port)
        if found is None:
            raise not_found(current.meta.id)
        if request.revision and found.mod_revision != request.revision:
            raise errors.Conflict("port changed since it was read",
                                  metadata={"port_id": current.meta.id})
        return await remove_in_txn(txn, current.meta.id)

    async with binding.network_turn(current.network_id):  # a bound port's attachments
        return await store.atomic(body)


async def remove_in_txn(txn: Txn, port_id: str) -> list[tuple[str, str]]:
    """Delete the port, its addresses, MAC, index entry and quota count in `txn`.

    A bound port is unbound in the same transaction (see `binding.unbind_in_txn`);
    returns the (network, node) whose realization that changed.
    """
    found = await txn.get(keys.port(port_id), Port)
    if found is None:
        return []
    record = found.value
    changed: list[tuple[str, str]] = []
    if record.node:
        changed = await binding.detach_in_txn(txn, record.network_id, record.node)
    for fixed in record.fixed_ips:
        ipam.release(txn, fixed.subnet_id, fixed.ip_address)
    if record.mac_address:
        ipam.release_mac(txn, record.mac_address)
    txn.delete(keys.network_port(record.network_id, port_id))
    txn.delete(keys.port(port_id))
    if record.device_owner not in INTERNAL_OWNERS:
        await quota.release(txn, record.meta.project_id, {"ports": 1})
    return changed
