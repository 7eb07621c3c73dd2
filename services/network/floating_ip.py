"""Floating IPs: addresses of an external network, mapped 1:1 onto a port's fixed IP.

A floating IP is ``network/floating-ips/<id>``; its address is an IPAM key of
the external network's subnet (``ipam.allocate`` in the floating IP's own
create transaction, with the ``floating_ips`` quota), so no two floating IPs,
ports or router gateways ever share one. Associating it needs a router that
has an interface on the port's subnet and its gateway on the floating IP's
network (FAILED_PRECONDITION ``nubis.floating_ip.no_router`` otherwise). A
fixed IP is the target of one floating IP at most: the association holds the
key ``network/floating-ip-targets/<port>/<address>``. The NAT itself (DNAT
floating → fixed, SNAT fixed → floating) is part of the router's desired
state, sent to its node with ``network.ensure_router``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from nubis.common.v1 import resource_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    ipam_pb2,
    network_pb2,
    network_service_pb2,
    port_pb2,
    router_pb2,
    subnet_pb2,
)

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.store import Txn, Versioned
from services.network import ipam, keys, port, router_node
from services.network.router_node import Env

FloatingIp = floating_ip_pb2.FloatingIp
UPDATABLE = ("name", "description", "labels")
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateFloatingIp")
OWNER = "network:floating_ip"
NO_ROUTER = "nubis.floating_ip.no_router"
TARGET_TAKEN = "nubis.floating_ip.fixed_ip_taken"
_STATES = FloatingIp.State.DESCRIPTOR


def not_found(fip_id: str) -> errors.NotFound:
    return errors.NotFound(f"floating IP {fip_id} not found",
                           metadata={"floating_ip_id": fip_id})


def _with_revision(item: Versioned[FloatingIp]) -> FloatingIp:
    fip = FloatingIp()
    fip.CopyFrom(item.value)
    fip.meta.revision = item.mod_revision
    return fip


async def get(env: Env, principal: Principal, fip_id: str) -> FloatingIp:
    resources.check_id(fip_id)
    found = await env.store.find(keys.floating_ip(fip_id), FloatingIp)
    if found is None or not policy.visible(principal, found.value.meta.project_id):
        raise not_found(fip_id)
    return _with_revision(found)


async def _in_txn(txn: Txn, principal: Principal, fip_id: str) -> Versioned[FloatingIp]:
    found = await txn.get(keys.floating_ip(fip_id), FloatingIp)
    if found is None or not policy.visible(principal, found.value.meta.project_id):
        raise not_found(fip_id)
    return found


def _validate(given: FloatingIp, fields: Sequence[str]) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields and given.meta.name:
        resources.check_name(violations, "floating_ip.meta.name", given.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "floating_ip.meta.labels", dict(given.meta.labels))
    if "description" in fields and len(given.meta.description) > 1024:
        violations.add("floating_ip.meta.description", "at most 1024 characters")
    violations.check("invalid floating IP")


async def _external(txn: Txn, network_id: str) -> network_pb2.Network:
    field = "floating_ip.floating_network_id"
    resources.check_id(network_id, field)
    found = await txn.get(keys.network(network_id), network_pb2.Network)
    if found is None or not found.value.external:
        raise errors.InvalidArgument(
            f"network {network_id} is not an external network",
            violations=[errors.FieldViolation(field, "not an external network")])
    return found.value


async def _allocate(txn: Txn, env: Env, net: network_pb2.Network, fip: FloatingIp,
                    wanted: str) -> str:
    """An address of the external network's IPv4 subnets (the one asked for, if any)."""
    holder = ipam_pb2.IpAllocation(owner=OWNER, holder_id=fip.meta.id,
                                   project_id=fip.meta.project_id)
    subnets = []
    for subnet_id in net.subnet_ids:
        found = await txn.get(keys.subnet(subnet_id), subnet_pb2.Subnet)
        if found is not None and (found.value.ip_version or 4) == 4:
            subnets.append(found.value)
    field = "floating_ip.floating_ip_address"
    if wanted:
        address = ipaddress.ip_address(wanted)
        inside = [subnet for subnet in subnets if address in ipaddress.ip_network(subnet.cidr)]
        if not inside:
            raise errors.InvalidArgument(
                f"{wanted} is in no subnet of network {net.meta.id}",
                violations=[errors.FieldViolation(field, "in no subnet of the network")])
        return await ipam.allocate(txn, env.store, inside[0], holder, wanted=wanted, field=field)
    for subnet in subnets:
        try:
            return await ipam.allocate(txn, env.store, subnet, holder,
                                       candidates=env.settings.ipam_candidates)
        except errors.ResourceExhausted:
            continue
    raise errors.ResourceExhausted(
        f"no free address left on external network {net.meta.id}", reason=ipam.EXHAUSTED,
        metadata={"network_id": net.meta.id})


def _check_wanted(principal: Principal, wanted: str) -> None:
    if not wanted:
        return
    field = "floating_ip.floating_ip_address"
    if not policy.is_cloud_admin(principal):
        raise errors.PermissionDenied("choosing the address needs the cloud-admin role",
                                      reason="nubis.policy.denied", metadata={"field": field})
    try:
        ipaddress.IPv4Address(wanted)
    except ValueError:
        raise errors.InvalidArgument(
            "floating_ip_address must be an IPv4 address",
            violations=[errors.FieldViolation(field, "an IPv4 address")]) from None


async def create(env: Env, principal: Principal, project_id: str,
                 request: floating_ip_pb2.CreateFloatingIpRequest) -> FloatingIp:
    """Allocate an address of the external network to the project (and associate it)."""
    given = request.floating_ip
    _validate(given, UPDATABLE)
    _check_wanted(principal, given.floating_ip_address)
    resources.check_id(given.floating_network_id, "floating_ip.floating_network_id")
    if request.port_id:
        resources.check_id(request.port_id, "port_id")
    made = FloatingIp(meta=resources.fresh_meta(given.meta, project_id), state=FloatingIp.DOWN,
                      floating_network_id=given.floating_network_id)
    idempotency = requests.prepare(env.store, project_id, CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        net = await _external(txn, given.floating_network_id)
        if request.validate_only:
            return ""
        made.floating_ip_address = await _allocate(txn, env, net, made,
                                                   given.floating_ip_address)
        await quota.reserve(txn, project_id, {"floating_ips": 1})
        txn.create(keys.floating_ip(made.meta.id), made)
        await requests.remember(txn, idempotency, made.meta.id)
        return made.meta.id

    fip_id = await env.store.atomic(body)
    if not fip_id:
        made.meta.ClearField("id")
        return made
    if request.port_id and fip_id == made.meta.id:
        try:
            return await associate(env, principal, floating_ip_pb2.AssociateFloatingIpRequest(
                id=fip_id, port_id=request.port_id))
        except errors.NubisError:
            # The create fails whole (as in Neutron): no address kept, no quota held, and
            # a retry under the same request_id makes it anew.
            await _remove(env, fip_id, idempotency.key if idempotency else "")
            raise
    return await get(env, principal, fip_id)


def _fip_filter(text: str, admin: bool) -> filtering.Filter:
    known: dict[str, frozenset[str] | None] = {
        "state": frozenset(filtering.enum_names(_STATES)), "floating_network_id": None,
        "floating_ip_address": None, "port_id": None, "router_id": None}
    if admin:
        known["project_id"] = None
    return filtering.parse(text, known)


def _fields(fip: FloatingIp) -> dict[str, str]:
    return {"state": filtering.enum_name(_STATES, fip.state),
            "floating_network_id": fip.floating_network_id,
            "floating_ip_address": fip.floating_ip_address, "port_id": fip.port_id,
            "router_id": fip.router_id, "project_id": fip.meta.project_id}


async def list_floating_ips(env: Env, principal: Principal,
                            request: floating_ip_pb2.ListFloatingIpsRequest
                            ) -> tuple[list[FloatingIp], str]:
    size = pages.page_size(request.page_size)
    scope = policy.list_scope(principal, all_projects=request.all_projects)
    chosen = _fip_filter(request.filter, policy.is_cloud_admin(principal))

    def keep(item: Versioned[FloatingIp]) -> bool:
        fip = item.value
        return (scope is None or fip.meta.project_id == scope) and chosen.matches(
            _fields(fip), fip.meta.labels)

    found, next_token = await pages.filtered_page(
        env.store, keys.FLOATING_IPS, FloatingIp, keep, size=size, page_token=request.page_token)
    return [_with_revision(item) for item in found], next_token


async def update(env: Env, principal: Principal,
                 request: floating_ip_pb2.UpdateFloatingIpRequest) -> FloatingIp:
    given = request.floating_ip
    fip_id = resources.check_id(given.meta.id, "floating_ip.meta.id")
    fields = resources.check_mask(request.update_mask.paths, UPDATABLE)
    _validate(given, fields)

    async def body(txn: Txn) -> None:
        found = await _in_txn(txn, principal, fip_id)
        if given.meta.revision and given.meta.revision != found.mod_revision:
            raise errors.Conflict("the floating IP changed since it was read",
                                  metadata={"floating_ip_id": fip_id})
        fip = _with_revision(found)
        if "name" in fields:
            fip.meta.name = given.meta.name
        if "description" in fields:
            fip.meta.description = given.meta.description
        if "labels" in fields:
            fip.meta.labels.clear()
            fip.meta.labels.update(given.meta.labels)
        fip.meta.update_time.CopyFrom(resources.now())
        fip.meta.revision = 0
        txn.put(keys.floating_ip(fip_id), fip)

    await env.store.atomic(body)
    return await get(env, principal, fip_id)


def _fixed_address(target: port_pb2.Port, wanted: str) -> port_pb2.FixedIp:
    for fixed in target.fixed_ips:
        if wanted and fixed.ip_address == wanted:
            return fixed
        if not wanted and ipaddress.ip_address(fixed.ip_address).version == 4:
            return fixed
    raise errors.InvalidArgument(
        f"port {target.meta.id} has no {'address ' + wanted if wanted else 'IPv4 address'}",
        violations=[errors.FieldViolation("fixed_ip_address", "not an IPv4 address of the port")])


async def _router_for(env: Env, fip: FloatingIp, subnet_id: str) -> router_pb2.Router:
    """The router with an interface on `subnet_id` and its gateway on the floating network."""
    routers, _ = await env.store.list_all(keys.ROUTERS, router_pb2.Router)
    for item in routers:
        router = item.value
        if router.external_gateway.network_id == fip.floating_network_id and any(
                interface.subnet_id == subnet_id for interface in router.interfaces):
            return router
    raise errors.FailedPrecondition(
        f"subnet {subnet_id} has no router with a gateway on network "
        f"{fip.floating_network_id}", reason=NO_ROUTER,
        metadata={"subnet_id": subnet_id, "floating_network_id": fip.floating_network_id})


def _target_index(fip: FloatingIp) -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(id=fip.meta.id, project_id=fip.meta.project_id)


def _detach(txn: Txn, fip: FloatingIp) -> None:
    if fip.port_id and fip.fixed_ip_address:
        txn.delete(keys.floating_ip_target(fip.port_id, fip.fixed_ip_address))
    fip.port_id = fip.fixed_ip_address = fip.router_id = ""
    fip.state = FloatingIp.DOWN


async def associate(env: Env, principal: Principal,
                    request: floating_ip_pb2.AssociateFloatingIpRequest) -> FloatingIp:
    """Map the floating IP onto a fixed IP of a port of its project, through its router."""
    fip = await get(env, principal, request.id)
    port_id = resources.check_id(request.port_id, "port_id")
    target = await port.get(env.store, principal, port_id)
    if target.meta.project_id != fip.meta.project_id:
        raise port.not_found(port_id)
    if target.device_owner.startswith("network:"):
        raise errors.InvalidArgument(
            f"port {port_id} belongs to the network service ({target.device_owner})",
            violations=[errors.FieldViolation("port_id", "a network:* port")])
    fixed = _fixed_address(target, request.fixed_ip_address)
    router = await _router_for(env, fip, fixed.subnet_id)

    async def body(txn: Txn) -> str:
        found = await _in_txn(txn, principal, fip.meta.id)
        record = _with_revision(found)
        if (record.port_id, record.fixed_ip_address) == (port_id, fixed.ip_address):
            return ""
        target_key = keys.floating_ip_target(port_id, fixed.ip_address)
        holder = await txn.get(target_key, resource_pb2.ResourceMeta)
        if holder is not None and holder.value.id != record.meta.id:
            raise errors.FailedPrecondition(
                f"{fixed.ip_address} of port {port_id} already has floating IP "
                f"{holder.value.id}", reason=TARGET_TAKEN,
                metadata={"floating_ip_id": holder.value.id})
        if await txn.get(keys.port(port_id), port_pb2.Port) is None:
            raise port.not_found(port_id)
        previous = record.router_id
        _detach(txn, record)
        record.port_id, record.fixed_ip_address = port_id, fixed.ip_address
        record.router_id = router.meta.id
        record.meta.update_time.CopyFrom(resources.now())
        record.meta.revision = 0
        txn.put(target_key, _target_index(record))
        txn.put(keys.floating_ip(record.meta.id), record)
        return previous

    previous = await env.store.atomic(body)
    await router_node.realize_all(env, [router.meta.id, previous])
    return await get(env, principal, fip.meta.id)


async def disassociate(env: Env, principal: Principal, fip_id: str) -> FloatingIp:
    """Remove the mapping; the address stays allocated to the project."""
    resources.check_id(fip_id)

    async def body(txn: Txn) -> str:
        found = await _in_txn(txn, principal, fip_id)
        record = _with_revision(found)
        previous = record.router_id
        if not record.port_id:
            return ""
        _detach(txn, record)
        record.meta.update_time.CopyFrom(resources.now())
        record.meta.revision = 0
        txn.put(keys.floating_ip(fip_id), record)
        return previous

    previous = await env.store.atomic(body)
    await router_node.realize_all(env, [previous])
    return await get(env, principal, fip_id)


async def delete(env: Env, principal: Principal, fip_id: str, revision: int = 0) -> None:
    """Release the address (disassociating it first), and its quota."""
    resources.check_id(fip_id)

    async def body(txn: Txn) -> str:
        found = await _in_txn(txn, principal, fip_id)
        if revision and revision != found.mod_revision:
            raise errors.Conflict("the floating IP changed since it was read",
                                  metadata={"floating_ip_id": fip_id})
        return await _remove_in_txn(txn, found)

    previous = await env.store.atomic(body)
    await router_node.realize_all(env, [previous])


async def _remove_in_txn(txn: Txn, found: Versioned[FloatingIp]) -> str:
    """Delete the floating IP with its address and quota; the router it went through."""
    record = _with_revision(found)
    previous = record.router_id
    _detach(txn, record)
    await _release_address(txn, record)
    txn.delete(keys.floating_ip(record.meta.id))
    await quota.release(txn, record.meta.project_id, {"floating_ips": 1})
    return previous


async def _remove(env: Env, fip_id: str, request_key: str) -> None:
    """Undo a create: the floating IP, its address, its quota and its request record."""
    async def body(txn: Txn) -> str:
        found = await txn.get(keys.floating_ip(fip_id), FloatingIp)
        if found is None:
            return ""
        if request_key:
            txn.delete(request_key)
        return await _remove_in_txn(txn, found)

    await router_node.realize_all(env, [await env.store.atomic(body)])


async def _release_address(txn: Txn, fip: FloatingIp) -> None:
    net = await txn.get(keys.network(fip.floating_network_id), network_pb2.Network)
    address = ipaddress.ip_address(fip.floating_ip_address)
    for subnet_id in net.value.subnet_ids if net is not None else ():
        found = await txn.get(keys.subnet(subnet_id), subnet_pb2.Subnet)
        if found is not None and address in ipaddress.ip_network(found.value.cidr):
            ipam.release(txn, subnet_id, fip.floating_ip_address)
            return


async def port_gone(env: Env, port_id: str) -> None:
    """Disassociate every floating IP of a deleted port (what its delete leaves behind)."""
    items, _ = await env.store.list_all(keys.FLOATING_IPS, FloatingIp)
    routers: list[str] = []
    for item in items:
        if item.value.port_id != port_id:
            continue

        async def body(txn: Txn, fip_id: str = item.value.meta.id) -> str:
            found = await txn.get(keys.floating_ip(fip_id), FloatingIp)
            if found is None or found.value.port_id != port_id:
                return ""
            record = _with_revision(found)
            previous = record.router_id
            _detach(txn, record)
            record.meta.revision = 0
            txn.put(keys.floating_ip(fip_id), record)
            return previous

        routers.append(await env.store.atomic(body))
    await router_node.realize_all(env, routers)
