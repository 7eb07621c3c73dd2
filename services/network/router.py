"""Routers: interfaces on subnets, an uplink to an external network with SNAT, static routes.

A router is ``network/routers/<id>``, counted in the ``routers`` quota in
its create transaction, and hosted by one network node chosen at create
(FAILED_PRECONDITION ``nubis.router.no_network_node`` when none can). Each
interface is a router-owned port (device_owner ``network:router_interface``)
holding the subnet's gateway address: the address key is unique, so a
subnet's gateway belongs to one router at most, however many race. The
gateway is a ``network:router_gateway`` port with an address of the external
network's subnet. Both are bound to the router's node, so their networks are
realized there; then the router itself is (`router_node.realize`).

A port is made in its own transaction before the router records it; if the
router's transaction then fails, the port is deleted again.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from nubis.network.v1 import network_pb2, network_service_pb2, port_pb2, router_pb2, subnet_pb2

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.store import Txn, Versioned
from services.network import binding, keys, port, router_node
from services.network import network as network_module
from services.network import subnet as subnet_module
from services.network.router_node import Env

Router = router_pb2.Router
UPDATABLE = ("name", "description", "labels", "external_gateway", "routes", "admin_state_up")
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateRouter")
INTERFACE_OWNER = "network:router_interface"
GATEWAY_OWNER = "network:router_gateway"
IN_USE = "nubis.router.in_use"
INTERFACE_EXISTS = "nubis.router.interface_exists"
INTERFACE_IN_USE = "nubis.router.interface_in_use"
GATEWAY_IN_USE = "nubis.router.gateway_in_use"
NO_GATEWAY_IP = "nubis.router.subnet_without_gateway"
_STATES = Router.State.DESCRIPTOR
_MAX_ROUTES = 32


def not_found(router_id: str) -> errors.NotFound:
    return errors.NotFound(f"router {router_id} not found", metadata={"router_id": router_id})


def with_revision(item: Versioned[Router]) -> Router:
    router = Router()
    router.CopyFrom(item.value)
    router.meta.revision = item.mod_revision
    return router


def _shown(router: Router, principal: Principal | None) -> Router:
    if principal is not None and not policy.is_cloud_admin(principal):
        router.ClearField("node")  # the hosting node is for operators
    return router


async def fetch(env: Env, principal: Principal | None, router_id: str) -> Router:
    resources.check_id(router_id, "router_id" if principal is None else "id")
    found = await env.store.find(keys.router(router_id), Router)
    if found is None or (principal is not None
                         and not policy.visible(principal, found.value.meta.project_id)):
        raise not_found(router_id)
    return with_revision(found)


async def get(env: Env, principal: Principal, router_id: str) -> Router:
    return _shown(await fetch(env, principal, router_id), principal)


async def in_txn(txn: Txn, principal: Principal | None, router_id: str) -> Router:
    found = await txn.get(keys.router(router_id), Router)
    if found is None or (principal is not None
                         and not policy.visible(principal, found.value.meta.project_id)):
        raise not_found(router_id)
    return with_revision(found)


def _validate(given: Router, fields: Sequence[str]) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields and given.meta.name:
        resources.check_name(violations, "router.meta.name", given.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "router.meta.labels", dict(given.meta.labels))
    if "description" in fields and len(given.meta.description) > 1024:
        violations.add("router.meta.description", "at most 1024 characters")
    if "external_gateway" in fields and given.HasField("external_gateway"):
        gateway = given.external_gateway
        if gateway.network_id and not resources.is_uuid(gateway.network_id):
            violations.add("router.external_gateway.network_id", "must be a UUID")
    if "routes" in fields:
        _check_routes(violations, given.routes)
    violations.check("invalid router")


def _check_routes(violations: errors.ViolationCollector,
                  routes: Sequence[router_pb2.Route]) -> None:
    if len(routes) > _MAX_ROUTES:
        violations.add("router.routes", f"at most {_MAX_ROUTES} routes")
    for index, route in enumerate(routes):
        try:
            ipaddress.ip_network(route.destination, strict=False)
        except ValueError:
            violations.add(f"router.routes[{index}].destination", "must be a CIDR")
        try:
            ipaddress.ip_address(route.nexthop)
        except ValueError:
            violations.add(f"router.routes[{index}].nexthop", "must be an IP address")


async def _check_nexthops(env: Env, router: Router) -> None:
    """Every route's next hop is on one of the router's subnets."""
    cidrs = []
    for interface in router.interfaces:
        found = await env.store.find(keys.subnet(interface.subnet_id), subnet_pb2.Subnet)
        if found is not None:
            cidrs.append(ipaddress.ip_network(found.value.cidr))
    violations = errors.ViolationCollector()
    for index, route in enumerate(router.routes):
        hop = ipaddress.ip_address(route.nexthop)
        if not any(hop.version == cidr.version and hop in cidr for cidr in cidrs):
            violations.add(f"router.routes[{index}].nexthop", "not on a subnet of the router")
    violations.check("invalid router")


async def create(env: Env, principal: Principal, project_id: str,
                 request: router_pb2.CreateRouterRequest) -> Router:
    """A router on a network node (chosen now), with its gateway if one is asked for."""
    given = request.router
    _validate(given, UPDATABLE)
    if given.routes:
        raise errors.InvalidArgument(
            "a new router has no subnets for its routes' next hops; add routes later",
            violations=[errors.FieldViolation("router.routes", "set with UpdateRouter")])
    gateway_asked = given.HasField("external_gateway") and bool(given.external_gateway.network_id)
    if gateway_asked:
        await _external(env, given.external_gateway.network_id)
    node = await router_node.choose_node(env)
    made = Router(meta=resources.fresh_meta(given.meta, project_id), state=Router.BUILD,
                  node=node, admin_state_up=given.admin_state_up
                  if given.HasField("admin_state_up") else True)
    idempotency = requests.prepare(env.store, project_id, CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        if request.validate_only:
            return ""
        await quota.reserve(txn, project_id, {"routers": 1})
        txn.create(keys.router(made.meta.id), made)
        await requests.remember(txn, idempotency, made.meta.id)
        return made.meta.id

    router_id = await env.store.atomic(body)
    if not router_id:
        made.meta.ClearField("id")
        return _shown(made, principal)
    if router_id == made.meta.id and gateway_asked:
        try:
            await _set_gateway(env, principal, router_id, given.external_gateway)
        except errors.NubisError:
            # The create fails whole: a retry under the same request_id makes it anew.
            await _undo_create(env, router_id, idempotency)
            raise
    await router_node.realize(env, router_id)
    return await get(env, principal, router_id)


async def _undo_create(env: Env, router_id: str,
                       idempotency: requests.Idempotency | None) -> None:
    async def body(txn: Txn) -> None:
        router = await in_txn(txn, None, router_id)
        txn.delete(keys.router(router_id))
        if idempotency is not None:
            txn.delete(idempotency.key)
        await quota.release(txn, router.meta.project_id, {"routers": 1})

    await env.store.atomic(body)


def _router_filter(text: str, admin: bool) -> filtering.Filter:
    known: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(filtering.enum_names(_STATES))}
    if admin:
        known.update(node=None, project_id=None)
    return filtering.parse(text, known)


def _fields(router: Router) -> dict[str, str]:
    return {"name": router.meta.name, "node": router.node,
            "project_id": router.meta.project_id,
            "state": filtering.enum_name(_STATES, router.state)}


async def list_routers(env: Env, principal: Principal, request: router_pb2.ListRoutersRequest
                       ) -> tuple[list[Router], str]:
    size = pages.page_size(request.page_size)
    scope = policy.list_scope(principal, all_projects=request.all_projects)
    chosen = _router_filter(request.filter, policy.is_cloud_admin(principal))

    def keep(item: Versioned[Router]) -> bool:
        router = item.value
        return (scope is None or router.meta.project_id == scope) and chosen.matches(
            _fields(router), router.meta.labels)

    found, next_token = await pages.filtered_page(
        env.store, keys.ROUTERS, Router, keep, size=size, page_token=request.page_token)
    return [_shown(with_revision(item), principal) for item in found], next_token


async def update(env: Env, principal: Principal, request: router_pb2.UpdateRouterRequest
                 ) -> Router:
    """Change metadata, routes, admin state, or set, replace or clear the gateway."""
    given = request.router
    router_id = resources.check_id(given.meta.id, "router.meta.id")
    fields = resources.check_mask(request.update_mask.paths, UPDATABLE)
    _validate(given, fields)
    current = await fetch(env, principal, router_id)
    if "routes" in fields:
        probe = Router()
        probe.CopyFrom(current)
        del probe.routes[:]
        probe.routes.extend(given.routes)
        await _check_nexthops(env, probe)

    async def body(txn: Txn) -> None:
        router = await in_txn(txn, principal, router_id)
        if given.meta.revision and given.meta.revision != router.meta.revision:
            raise errors.Conflict("the router changed since it was read",
                                  metadata={"router_id": router_id})
        _apply(router, given, fields)
        txn.put(keys.router(router_id), router)

    await env.store.atomic(body)
    if "external_gateway" in fields:
        wanted = given.external_gateway
        if given.HasField("external_gateway") and wanted.network_id:
            await _set_gateway(env, principal, router_id, wanted)
        else:
            await _clear_gateway(env, principal, router_id)
    await router_node.realize(env, router_id)
    return await get(env, principal, router_id)


def _apply(router: Router, given: Router, fields: Sequence[str]) -> None:
    if "name" in fields:
        router.meta.name = given.meta.name
    if "description" in fields:
        router.meta.description = given.meta.description
    if "labels" in fields:
        router.meta.labels.clear()
        router.meta.labels.update(given.meta.labels)
    if "routes" in fields:
        del router.routes[:]
        router.routes.extend(given.routes)
    if "admin_state_up" in fields:
        router.admin_state_up = given.admin_state_up
    router.meta.update_time.CopyFrom(resources.now())
    router.meta.revision = 0


# --- the gateway ----------------------------------------------------------------


async def _external(env: Env, network_id: str) -> network_pb2.Network:
    field = "router.external_gateway.network_id"
    found = await env.store.find(keys.network(network_id), network_pb2.Network)
    if found is None or not found.value.external:
        raise errors.InvalidArgument(
            f"network {network_id} is not an external network",
            violations=[errors.FieldViolation(field, "not an external network")])
    if network_module.deleting(found.value):
        raise errors.FailedPrecondition(f"network {network_id} is being deleted",
                                        reason=network_module.DELETING)
    return found.value


async def _set_gateway(env: Env, principal: Principal, router_id: str,
                       wanted: router_pb2.ExternalGateway) -> None:
    """Give the router an uplink (replacing one on another network) with SNAT unless off."""
    net = await _external(env, wanted.network_id)
    if wanted.external_fixed_ips and not policy.is_cloud_admin(principal):
        raise errors.PermissionDenied(
            "choosing the gateway's addresses needs the cloud-admin role",
            reason="nubis.policy.denied",
            metadata={"field": "router.external_gateway.external_fixed_ips"})
    router = await fetch(env, principal, router_id)
    snat = wanted.enable_snat if wanted.HasField("enable_snat") else True
    current = router.external_gateway
    if router.HasField("external_gateway") and current.network_id == net.meta.id \
            and current.port_id and not wanted.external_fixed_ips:
        if current.enable_snat != snat:
            await _store_gateway(env, router_id, lambda gateway: setattr(
                gateway, "enable_snat", snat))
        return
    if router.HasField("external_gateway") and current.port_id:
        await _clear_gateway(env, principal, router_id)
    made = await port.create_internal(
        env.store, env.settings, env.turns, network_id=net.meta.id,
        project_id=router.meta.project_id, device_owner=GATEWAY_OWNER, device_id=router_id,
        fixed_ips=list(wanted.external_fixed_ips), name=f"router-gateway-{router_id[:8]}")
    if not any(ipaddress.ip_address(fixed.ip_address).version == 4 for fixed in made.fixed_ips):
        await _drop_port(env, made.meta.id)
        raise errors.FailedPrecondition(
            f"external network {net.meta.id} has no IPv4 subnet for the gateway",
            reason="nubis.router.external_without_subnet", metadata={"network_id": net.meta.id})
    gateway = router_pb2.ExternalGateway(network_id=net.meta.id, port_id=made.meta.id,
                                         enable_snat=snat, external_fixed_ips=made.fixed_ips)
    try:
        await _store_gateway(env, router_id, lambda record: record.CopyFrom(gateway))
    except errors.NubisError:
        await _drop_port(env, made.meta.id)
        raise
    await router_node.bind_to_node(env, made.meta.id, router)


async def _store_gateway(env: Env, router_id: str,
                         change: Callable[[router_pb2.ExternalGateway], None]) -> None:
    async def body(txn: Txn) -> None:
        router = await in_txn(txn, None, router_id)
        change(router.external_gateway)
        router.meta.revision = 0
        router.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.router(router_id), router)

    await env.store.atomic(body)


async def _clear_gateway(env: Env, principal: Principal, router_id: str) -> None:
    """Remove the uplink; refused while floating IPs go through it."""
    if await router_node.floating_ips_of(env.store, router_id):
        raise errors.FailedPrecondition(
            f"router {router_id} carries floating IPs; disassociate them first",
            reason=GATEWAY_IN_USE, metadata={"router_id": router_id})

    async def body(txn: Txn) -> list[binding.Pair]:
        router = await in_txn(txn, principal, router_id)
        if not router.HasField("external_gateway"):
            return []
        changed = await port.remove_in_txn(txn, router.external_gateway.port_id) \
            if router.external_gateway.port_id else []
        router.ClearField("external_gateway")
        router.meta.revision = 0
        txn.put(keys.router(router_id), router)
        return changed

    changed = await env.store.atomic(body)
    await env.realizer.realize_all(changed)


async def _drop_port(env: Env, port_id: str) -> None:
    async def body(txn: Txn) -> list[binding.Pair]:
        return await port.remove_in_txn(txn, port_id)

    await env.realizer.realize_all(await env.store.atomic(body))


# --- interfaces -----------------------------------------------------------------


async def _subnet_for(env: Env, principal: Principal, router: Router,
                      subnet_id: str) -> subnet_pb2.Subnet:
    found = await subnet_module.get(env.store, principal, subnet_id)
    if found.meta.project_id != router.meta.project_id and not policy.is_cloud_admin(principal):
        net = await env.store.find(keys.network(found.network_id), network_pb2.Network)
        if net is None or not net.value.shared:
            raise subnet_module.not_found(subnet_id)
    net = await env.store.find(keys.network(found.network_id), network_pb2.Network)
    if net is not None and net.value.external:
        raise errors.InvalidArgument(
            "an external network's subnet is a router's gateway, not an interface",
            violations=[errors.FieldViolation("subnet_id", "on an external network")])
    cidr = ipaddress.ip_network(found.cidr)
    for interface in router.interfaces:
        if interface.subnet_id == subnet_id:
            raise errors.AlreadyExists(
                f"router {router.meta.id} already has an interface on subnet {subnet_id}",
                reason=INTERFACE_EXISTS, metadata={"subnet_id": subnet_id})
        other = await env.store.find(keys.subnet(interface.subnet_id), subnet_pb2.Subnet)
        if other is not None and ipaddress.ip_network(other.value.cidr).overlaps(cidr):
            raise errors.InvalidArgument(
                f"subnet {subnet_id} overlaps subnet {interface.subnet_id} of the router",
                violations=[errors.FieldViolation("subnet_id", "overlaps another interface")])
    return found


async def _interface_port(env: Env, principal: Principal, router: Router,
                          request: router_pb2.AddRouterInterfaceRequest
                          ) -> tuple[port_pb2.Port, str]:
    """The router port (made now on the subnet's gateway, or taken over) and its subnet."""
    if request.WhichOneof("target") == "port_id":
        return await _take_port(env, principal, router, request.port_id)
    subnet_id = resources.check_id(request.subnet_id, "subnet_id")
    subnet = await _subnet_for(env, principal, router, subnet_id)
    if not subnet.gateway_ip:
        raise errors.FailedPrecondition(
            f"subnet {subnet_id} has no gateway address for the router",
            reason=NO_GATEWAY_IP, metadata={"subnet_id": subnet_id})
    made = await port.create_internal(
        env.store, env.settings, env.turns, network_id=subnet.network_id,
        project_id=router.meta.project_id, device_owner=INTERFACE_OWNER,
        device_id=router.meta.id, name=f"router-interface-{router.meta.id[:8]}",
        fixed_ips=[port_pb2.FixedIp(subnet_id=subnet_id, ip_address=subnet.gateway_ip)])
    return made, subnet_id


async def _take_port(env: Env, principal: Principal, router: Router,
                     port_id: str) -> tuple[port_pb2.Port, str]:
    """An unused port of the router's project, with one address, becomes a router port."""
    checked = resources.check_id(port_id, "port_id")
    given = await port.get(env.store, principal, checked)
    if given.device_owner or given.device_id or given.node:
        raise errors.FailedPrecondition(f"port {port_id} is in use by {given.device_owner}",
                                        reason=port.IN_USE, metadata={"port_id": port_id})
    if len(given.fixed_ips) != 1:
        raise errors.InvalidArgument(
            "a router interface port has exactly one fixed IP",
            violations=[errors.FieldViolation("port_id", "needs exactly one fixed IP")])
    subnet_id = given.fixed_ips[0].subnet_id
    await _subnet_for(env, principal, router, subnet_id)

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.port(checked), port_pb2.Port)
        if found is None:
            raise port.not_found(checked)
        record = found.value
        if record.device_owner or record.device_id or record.node:
            raise errors.FailedPrecondition(f"port {port_id} was taken meanwhile",
                                            reason=port.IN_USE, metadata={"port_id": port_id})
        record.device_owner, record.device_id = INTERFACE_OWNER, router.meta.id
        record.port_security_enabled = False
        del record.security_group_ids[:]
        txn.put(keys.port(checked), record)

    await env.store.atomic(body)
    return await port.fetch(env.store, checked), subnet_id


async def add_interface(env: Env, principal: Principal,
                        request: router_pb2.AddRouterInterfaceRequest) -> Router:
    """Attach a subnet (a port at its gateway address) or a free port to the router."""
    router_id = resources.check_id(request.router_id, "router_id")
    router = await fetch(env, principal, router_id)
    if request.WhichOneof("target") is None:
        raise errors.InvalidArgument(
            "name the subnet or the port to attach",
            violations=[errors.FieldViolation("subnet_id", "subnet_id or port_id is required")])
    made, subnet_id = await _interface_port(env, principal, router, request)
    taken_over = request.WhichOneof("target") == "port_id"
    address = next(fixed.ip_address for fixed in made.fixed_ips if fixed.subnet_id == subnet_id)

    async def body(txn: Txn) -> None:
        record = await in_txn(txn, principal, router_id)
        if any(interface.subnet_id == subnet_id for interface in record.interfaces):
            raise errors.AlreadyExists(
                f"router {router_id} already has an interface on subnet {subnet_id}",
                reason=INTERFACE_EXISTS, metadata={"subnet_id": subnet_id})
        record.interfaces.add(subnet_id=subnet_id, port_id=made.meta.id, ip_address=address)
        record.meta.revision = 0
        record.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.router(router_id), record)

    try:
        await env.store.atomic(body)
    except errors.NubisError:
        if not taken_over:
            await _drop_port(env, made.meta.id)
        raise
    await router_node.bind_to_node(env, made.meta.id, router)
    await router_node.realize(env, router_id)
    return await get(env, principal, router_id)


async def remove_interface(env: Env, principal: Principal,
                           request: router_pb2.RemoveRouterInterfaceRequest) -> Router:
    """Detach a subnet (by subnet or by port); the router port is deleted."""
    router_id = resources.check_id(request.router_id, "router_id")
    router = await fetch(env, principal, router_id)
    target = request.WhichOneof("target")
    wanted = request.subnet_id if target == "subnet_id" else request.port_id
    chosen = next((interface for interface in router.interfaces
                   if wanted in (interface.subnet_id, interface.port_id)), None)
    if target is None or chosen is None:
        raise errors.NotFound(f"router {router_id} has no interface on {wanted or 'nothing'}",
                              metadata={"router_id": router_id})
    subnet = await env.store.find(keys.subnet(chosen.subnet_id), subnet_pb2.Subnet)
    if subnet is not None:
        cidr = ipaddress.ip_network(subnet.value.cidr)
        for item in await router_node.floating_ips_of(env.store, router_id):
            fixed = item.value.fixed_ip_address
            if fixed and ipaddress.ip_address(fixed) in cidr:
                raise errors.FailedPrecondition(
                    f"floating IP {item.value.meta.id} reaches subnet {chosen.subnet_id} "
                    "through this router; disassociate it first",
                    reason=INTERFACE_IN_USE, metadata={"floating_ip_id": item.value.meta.id})

    async def body(txn: Txn) -> list[binding.Pair]:
        record = await in_txn(txn, principal, router_id)
        kept = [interface for interface in record.interfaces
                if interface.port_id != chosen.port_id]
        del record.interfaces[:]
        record.interfaces.extend(kept)
        record.meta.revision = 0
        txn.put(keys.router(router_id), record)
        return await port.remove_in_txn(txn, chosen.port_id)

    changed = await env.store.atomic(body)
    await env.realizer.realize_all(changed)
    await router_node.realize(env, router_id)
    return await get(env, principal, router_id)


async def delete(env: Env, principal: Principal, router_id: str, revision: int = 0) -> None:
    """Delete a router without interfaces or floating IPs; its gateway goes with it."""
    router = await fetch(env, principal, router_id)
    if router.interfaces:
        raise errors.FailedPrecondition(
            f"router {router_id} still has {len(router.interfaces)} interface(s)",
            reason=IN_USE, metadata={"router_id": router_id})
    if await router_node.floating_ips_of(env.store, router_id):
        raise errors.FailedPrecondition(f"router {router_id} still carries floating IPs",
                                        reason=IN_USE, metadata={"router_id": router_id})

    async def body(txn: Txn) -> list[binding.Pair]:
        record = await in_txn(txn, principal, router_id)
        if revision and revision != record.meta.revision:
            raise errors.Conflict("the router changed since it was read",
                                  metadata={"router_id": router_id})
        if record.interfaces:
            raise errors.FailedPrecondition(f"router {router_id} got an interface meanwhile",
                                            reason=IN_USE, metadata={"router_id": router_id})
        changed: list[binding.Pair] = []
        if record.HasField("external_gateway") and record.external_gateway.port_id:
            changed = await port.remove_in_txn(txn, record.external_gateway.port_id)
        txn.delete(keys.router(router_id))
        await quota.release(txn, record.meta.project_id, {"routers": 1})
        return changed

    changed = await env.store.atomic(body)
    if router.node:
        await router_node.remove(env, router_id, router.node)
    await env.realizer.realize_all(changed)
