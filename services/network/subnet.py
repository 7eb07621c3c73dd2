"""Subnets: the address ranges of a network, with their allocation pools, gateway and DHCP.

A subnet's create transaction reads its network and every other subnet the
network lists, and writes the network back with the new subnet in
`subnet_ids`: two racing creates of overlapping ranges on one network both
compare the network's revision, so only one commits and the other's rerun
sees it and is refused. The same CIDR on another network is fine.

With DHCP on, the service keeps the first address of the first allocation
pool for the network's DHCP server (`Subnet.dhcp_address`, an IPAM key held
by the subnet), as Neutron's DHCP port takes the first free pool address.
"""

from __future__ import annotations

import ipaddress

from nubis.common.v1 import resource_pb2
from nubis.network.v1 import ipam_pb2, network_pb2, network_service_pb2, subnet_pb2

from services.common import errors, filtering, pages, quota, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.network import keys, validation
from services.network import network as network_module

Subnet = subnet_pb2.Subnet
UPDATABLE = ("name", "description", "labels", "gateway_ip", "disable_gateway",
             "allocation_pools", "dns_nameservers", "dhcp_enabled", "host_routes")
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateSubnet")
IN_USE = "nubis.subnet.in_use"
DHCP_OWNER = "network:dhcp"
_DELETING_LABEL = "nubis.io/deleting"
_MAX_DNS = 5
_MAX_ROUTES = 20


def not_found(subnet_id: str) -> errors.NotFound:
    return errors.NotFound(f"subnet {subnet_id} not found", metadata={"subnet_id": subnet_id})


def cidr_of(subnet: Subnet) -> validation.Cidr:
    return ipaddress.ip_network(subnet.cidr)


def pools_of(subnet: Subnet) -> list[validation.Pool]:
    """The allocation pools of a stored subnet, as integer ranges."""
    return [validation.Pool(int(ipaddress.ip_address(pool.start)),
                            int(ipaddress.ip_address(pool.end)))
            for pool in subnet.allocation_pools]


def _with_revision(item: Versioned[Subnet]) -> Subnet:
    subnet = Subnet()
    subnet.CopyFrom(item.value)
    subnet.meta.revision = item.mod_revision
    return subnet


async def fetch(store: Store, subnet_id: str) -> Subnet:
    resources.check_id(subnet_id, "id")
    found = await store.find(keys.subnet(subnet_id), Subnet)
    if found is None:
        raise not_found(subnet_id)
    return _with_revision(found)


async def get(store: Store, principal: Principal | None, subnet_id: str) -> Subnet:
    """A subnet whose network the caller sees (another project's private one: NOT_FOUND)."""
    subnet = await fetch(store, subnet_id)
    found = await store.find(keys.network(subnet.network_id), network_pb2.Network)
    if found is None or not network_module.visible(principal, found.value):
        raise not_found(subnet_id)
    return subnet


def _owns(principal: Principal | None, net: network_pb2.Network) -> bool:
    if network_module.is_admin(principal):
        return True
    assert principal is not None
    return net.meta.project_id == principal.project_id


def _check_meta(violations: errors.ViolationCollector, subnet: Subnet,
                fields: tuple[str, ...]) -> None:
    if "name" in fields and subnet.meta.name:
        resources.check_name(violations, "subnet.meta.name", subnet.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "subnet.meta.labels", dict(subnet.meta.labels))
    if "description" in fields and len(subnet.meta.description) > 1024:
        violations.add("subnet.meta.description", "at most 1024 characters")


def _check_dns(violations: errors.ViolationCollector, subnet: Subnet) -> None:
    if len(subnet.dns_nameservers) > _MAX_DNS:
        violations.add("subnet.dns_nameservers", f"at most {_MAX_DNS}")
    for index, server in enumerate(subnet.dns_nameservers):
        validation.parse_address(violations, f"subnet.dns_nameservers[{index}]", server)


def _check_routes(violations: errors.ViolationCollector, subnet: Subnet,
                  cidr: validation.Cidr) -> None:
    if len(subnet.host_routes) > _MAX_ROUTES:
        violations.add("subnet.host_routes", f"at most {_MAX_ROUTES}")
    for index, route in enumerate(subnet.host_routes):
        where = f"subnet.host_routes[{index}]"
        destination = validation.parse_cidr(violations, f"{where}.destination", route.destination)
        nexthop = validation.parse_address(violations, f"{where}.nexthop", route.nexthop)
        if destination is not None and destination.version != cidr.version:
            violations.add(f"{where}.destination", f"must be IPv{cidr.version}")
        if nexthop is not None and nexthop not in cidr:
            violations.add(f"{where}.nexthop", f"must be inside {cidr}")


def _gateway(violations: errors.ViolationCollector, subnet: Subnet,
             cidr: validation.Cidr) -> int | None:
    """The gateway as an integer (None: no gateway); "" picks the first host address."""
    if subnet.disable_gateway:
        if subnet.gateway_ip:
            violations.add("subnet.gateway_ip", "must be empty when disable_gateway is set")
        return None
    hosts = validation.host_range(cidr)
    if not subnet.gateway_ip:
        return hosts.first
    gateway = validation.parse_address(violations, "subnet.gateway_ip", subnet.gateway_ip)
    if gateway is None:
        return None
    if gateway.version != cidr.version or gateway not in cidr:
        violations.add("subnet.gateway_ip", f"must be inside the subnet {cidr}")
        return None
    if int(gateway) not in hosts:
        violations.add("subnet.gateway_ip", "must not be the network or broadcast address")
        return None
    return int(gateway)


def _shape(subnet: Subnet, cidr: validation.Cidr, violations: errors.ViolationCollector,
           fields: tuple[str, ...]) -> tuple[int | None, list[validation.Pool]]:
    """Gateway and pools checked against the CIDR and each other."""
    gateway = _gateway(violations, subnet, cidr)
    if subnet.allocation_pools:
        pools = validation.parse_pools(violations, "subnet.allocation_pools",
                                       subnet.allocation_pools, cidr)
        if gateway is not None and any(gateway in pool for pool in pools):
            violations.add("subnet.gateway_ip", "must not be inside an allocation pool")
    else:
        pools = validation.default_pools(cidr, gateway)
    if "dns_nameservers" in fields:
        _check_dns(violations, subnet)
    if "host_routes" in fields:
        _check_routes(violations, subnet, cidr)
    return gateway, pools


def _validate_new(subnet: Subnet) -> tuple[validation.Cidr, int | None, list[validation.Pool]]:
    violations = errors.ViolationCollector()
    _check_meta(violations, subnet, UPDATABLE)
    if not subnet.network_id:
        violations.add("subnet.network_id", "required")
    elif not resources.is_uuid(subnet.network_id):
        violations.add("subnet.network_id", "must be a UUID")
    cidr = validation.parse_cidr(violations, "subnet.cidr", subnet.cidr)
    if cidr is None:
        violations.check("invalid subnet")
        raise AssertionError("unreachable")
    if subnet.ip_version not in (0, cidr.version):
        violations.add("subnet.ip_version", f"does not match the cidr (IPv{cidr.version})")
    validation.check_subnet_size(violations, "subnet.cidr", cidr)
    gateway, pools = _shape(subnet, cidr, violations, UPDATABLE)
    violations.check("invalid subnet")
    return cidr, gateway, pools


def _record(request: Subnet, project_id: str, cidr: validation.Cidr, gateway: int | None,
            pools: list[validation.Pool]) -> Subnet:
    subnet = Subnet(
        meta=resources.fresh_meta(request.meta, project_id), state=Subnet.ACTIVE,
        network_id=request.network_id, ip_version=cidr.version, cidr=str(cidr),
        gateway_ip="" if gateway is None else validation.address(gateway, cidr.version),
        disable_gateway=request.disable_gateway, dhcp_enabled=request.dhcp_enabled,
        dns_nameservers=list(request.dns_nameservers),
        host_routes=list(request.host_routes),
    )
    _set_pools(subnet, pools, cidr.version)
    if not subnet.meta.name:
        subnet.meta.name = f"subnet-{subnet.meta.id[:8]}"
    return subnet


def _set_pools(subnet: Subnet, pools: list[validation.Pool], version: int) -> None:
    del subnet.allocation_pools[:]
    for pool in sorted(pools, key=lambda pool: pool.first):
        subnet.allocation_pools.add(start=validation.address(pool.first, version),
                                    end=validation.address(pool.last, version))


async def _check_overlap(txn: Txn, net: network_pb2.Network, cidr: validation.Cidr) -> None:
    for other_id in net.subnet_ids:
        other = await txn.get(keys.subnet(other_id), Subnet)
        if other is not None and cidr_of(other.value).overlaps(cidr):
            raise errors.InvalidArgument(
                f"{cidr} overlaps subnet {other_id} ({other.value.cidr}) of the network",
                violations=[errors.FieldViolation(
                    "subnet.cidr", f"overlaps {other.value.cidr} of subnet {other_id}")],
                reason="nubis.subnet.overlap", metadata={"subnet_id": other_id})


def _reserve_dhcp(txn: Txn, subnet: Subnet) -> None:
    """Keep the first pool address for the network's DHCP server (the subnet holds its key)."""
    if not subnet.dhcp_enabled or not subnet.allocation_pools:
        subnet.dhcp_address = ""
        return
    subnet.dhcp_address = subnet.allocation_pools[0].start
    txn.put(keys.fixed_ip(subnet.meta.id, subnet.dhcp_address), ipam_pb2.IpAllocation(
        subnet_id=subnet.meta.id, network_id=subnet.network_id, ip_address=subnet.dhcp_address,
        owner=DHCP_OWNER, holder_id=subnet.meta.id, project_id=subnet.meta.project_id))


async def create(store: Store, principal: Principal | None,
                 request: subnet_pb2.CreateSubnetRequest) -> Subnet:
    """A subnet on a network the caller owns; quota `subnets` of the network's project."""
    cidr, gateway, pools = _validate_new(request.subnet)
    caller_project = "" if principal is None else principal.project_id
    idempotency = requests.prepare(store, caller_project, CREATE_METHOD, request,
                                   request.request_id, validate_only=request.validate_only)

    async def body(txn: Txn) -> Subnet:
        net = await network_module.in_txn(txn, principal, request.subnet.network_id,
                                          field="subnet.network_id")
        if not _owns(principal, net):
            raise network_module.not_found(request.subnet.network_id)
        subnet = _record(request.subnet, net.meta.project_id, cidr, gateway, pools)
        if request.validate_only:
            await _check_overlap(txn, net, cidr)
            subnet.meta.id = ""
            return subnet
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return Subnet(meta=resource_pb2.ResourceMeta(id=earlier))
        await _check_overlap(txn, net, cidr)
        _reserve_dhcp(txn, subnet)
        await quota.reserve(txn, net.meta.project_id, {"subnets": 1})
        txn.create(keys.subnet(subnet.meta.id), subnet)
        net.subnet_ids.append(subnet.meta.id)
        txn.put(keys.network(net.meta.id), net)
        await requests.remember(txn, idempotency, subnet.meta.id)
        return subnet

    made = await store.atomic(body)
    if request.validate_only:
        return made
    return await fetch(store, made.meta.id)


def subnet_filter(text: str, *, admin: bool) -> filtering.Filter:
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "network_id": None, "ip_version": frozenset({"4", "6"}), "cidr": None}
    if admin:
        keys_["project_id"] = None
    return filtering.parse(text, keys_)


def _fields(subnet: Subnet) -> dict[str, str]:
    return {"name": subnet.meta.name, "network_id": subnet.network_id,
            "ip_version": str(subnet.ip_version), "cidr": subnet.cidr,
            "project_id": subnet.meta.project_id}


async def list_subnets(
    store: Store, principal: Principal | None, scope: str | None, page_size: int,
    page_token: str, wanted: filtering.Filter,
) -> tuple[list[Subnet], str]:
    """Subnets of `scope`'s networks and of shared/external ones, by id."""
    size = pages.page_size(page_size)
    nets, _ = await store.list_all(keys.NETWORKS, network_pb2.Network)
    seen = {item.value.meta.id for item in nets
            if network_module.visible(principal, item.value) and (
                scope is None or item.value.meta.project_id == scope
                or item.value.shared or item.value.external)}

    def keep(item: Versioned[Subnet]) -> bool:
        return item.value.network_id in seen and wanted.matches(_fields(item.value),
                                                                item.value.meta.labels)

    found, token = await pages.filtered_page(store, keys.SUBNETS, Subnet, keep, size=size,
                                             page_token=page_token)
    return [_with_revision(item) for item in found], token


async def allocated(store: Store, subnet_id: str) -> list[ipam_pb2.IpAllocation]:
    """Every address held in the subnet (ports, DHCP, routers, floating IPs)."""
    items, _ = await store.list_all(keys.subnet_ips(subnet_id), ipam_pb2.IpAllocation)
    return [item.value for item in items]


async def update(store: Store, principal: Principal | None,
                 request: subnet_pb2.UpdateSubnetRequest) -> Subnet:
    """Change the masked fields; pools must keep every address a port holds."""
    fields = tuple(resources.check_mask(request.update_mask.paths, UPDATABLE))
    current = await get(store, principal, request.subnet.meta.id)
    net = await network_module.fetch(store, current.network_id)
    if not _owns(principal, net):
        raise not_found(current.meta.id)
    held = [alloc for alloc in await allocated(store, current.meta.id) if alloc.port_id]
    expected = request.subnet.meta.revision

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.subnet(current.meta.id), Subnet)
        if found is None:
            raise not_found(current.meta.id)
        if expected and found.mod_revision != expected:
            raise errors.Conflict("subnet changed since it was read",
                                  metadata={"subnet_id": current.meta.id})
        subnet = found.value
        old_dhcp = subnet.dhcp_address
        _apply(subnet, request.subnet, fields, held)
        if old_dhcp and old_dhcp != subnet.dhcp_address:
            txn.delete(keys.fixed_ip(subnet.meta.id, old_dhcp))
        if subnet.dhcp_enabled and not subnet.dhcp_address and subnet.allocation_pools:
            first = subnet.allocation_pools[0].start
            taken = await txn.get(keys.fixed_ip(subnet.meta.id, first), ipam_pb2.IpAllocation)
            if taken is not None and taken.value.port_id:
                raise errors.FailedPrecondition(
                    f"{first} (the DHCP server's address) is held by a port",
                    reason="nubis.subnet.dhcp_address_taken", metadata={"ip_address": first})
            _reserve_dhcp(txn, subnet)
        subnet.meta.update_time.CopyFrom(resources.now())
        subnet.meta.revision = 0
        txn.put(keys.subnet(subnet.meta.id), subnet)

    await store.atomic(body)
    return await fetch(store, current.meta.id)


def _apply(subnet: Subnet, given: Subnet, fields: tuple[str, ...],
           held: list[ipam_pb2.IpAllocation]) -> None:
    merged = Subnet()
    merged.CopyFrom(subnet)
    for name in fields:
        if name in ("name", "description"):
            setattr(merged.meta, name, getattr(given.meta, name))
        elif name == "labels":
            merged.meta.labels.clear()
            merged.meta.labels.update(given.meta.labels)
        elif name in ("allocation_pools", "dns_nameservers", "host_routes"):
            merged.ClearField(name)  # type: ignore[arg-type]
            getattr(merged, name).extend(getattr(given, name))
        else:
            setattr(merged, name, getattr(given, name))
    cidr = cidr_of(merged)
    violations = errors.ViolationCollector()
    _check_meta(violations, merged, fields)
    if "gateway_ip" in fields or "disable_gateway" in fields or "allocation_pools" in fields:
        gateway, pools = _shape(merged, cidr, violations, fields)
        merged.gateway_ip = "" if gateway is None else validation.address(gateway, cidr.version)
        for alloc in held:
            value = int(ipaddress.ip_address(alloc.ip_address))
            if not any(value in pool for pool in pools) or value == gateway:
                violations.add("subnet.allocation_pools",
                               f"{alloc.ip_address} is held by port {alloc.port_id}")
                break
        _set_pools(merged, pools, cidr.version)
    else:
        _shape(merged, cidr, violations, fields)
    violations.check("invalid subnet")
    if not merged.dhcp_enabled:
        merged.dhcp_address = ""
    elif merged.dhcp_address and merged.allocation_pools \
            and merged.dhcp_address != merged.allocation_pools[0].start:
        merged.dhcp_address = ""  # moved with the pools: reserved again at the new start
    subnet.CopyFrom(merged)


async def _mark(store: Store, subnet_id: str, revision: int, on: bool) -> int:
    async def body(txn: Txn) -> None:
        found = await txn.get(keys.subnet(subnet_id), Subnet)
        if found is None:
            raise not_found(subnet_id)
        if revision and on and found.mod_revision != revision:
            raise errors.Conflict("subnet changed since it was read",
                                  metadata={"subnet_id": subnet_id})
        subnet = found.value
        if on:
            subnet.meta.labels[_DELETING_LABEL] = "true"
        else:
            subnet.meta.labels.pop(_DELETING_LABEL, None)
        txn.put(keys.subnet(subnet_id), subnet)

    await store.atomic(body)
    return (await store.get(keys.subnet(subnet_id), Subnet)).mod_revision


def deleting(subnet: Subnet) -> bool:
    return _DELETING_LABEL in subnet.meta.labels


async def delete(store: Store, principal: Principal | None,
                 request: subnet_pb2.DeleteSubnetRequest) -> None:
    """Delete the subnet; refused (``nubis.subnet.in_use``) while ports hold addresses in it.

    The subnet is marked first (its revision moves), so a port create racing
    the check runs again, sees the mark and is refused.
    """
    current = await get(store, principal, request.id)
    net = await network_module.fetch(store, current.network_id)
    if not _owns(principal, net):
        raise not_found(request.id)
    marked = await _mark(store, current.meta.id, request.revision, True)
    try:
        held = [alloc for alloc in await allocated(store, current.meta.id)
                if alloc.owner != DHCP_OWNER]
        if held:
            raise errors.FailedPrecondition(
                f"subnet {current.meta.id} has {len(held)} address(es) in use",
                reason=IN_USE, metadata={"subnet_id": current.meta.id, "in_use": str(len(held))})

        async def body(txn: Txn) -> None:
            found = await txn.get(keys.subnet(current.meta.id), Subnet)
            if found is None or found.mod_revision != marked:
                raise errors.Conflict("subnet changed while it was being deleted",
                                      metadata={"subnet_id": current.meta.id})
            owner = await txn.get(keys.network(current.network_id), network_pb2.Network)
            if owner is not None:
                updated = owner.value
                kept = [sid for sid in updated.subnet_ids if sid != current.meta.id]
                del updated.subnet_ids[:]
                updated.subnet_ids.extend(kept)
                txn.put(keys.network(current.network_id), updated)
            await remove_in_txn(txn, current.meta.id)

        await store.atomic(body)
    except BaseException:
        if await store.find(keys.subnet(current.meta.id), Subnet) is not None:
            await _mark(store, current.meta.id, 0, False)
        raise


async def remove_in_txn(txn: Txn, subnet_id: str) -> None:
    """Delete the subnet, its DHCP address and its quota count in `txn` (no port holds one)."""
    found = await txn.get(keys.subnet(subnet_id), Subnet)
    if found is None:
        return
    subnet = found.value
    if subnet.dhcp_address:
        txn.delete(keys.fixed_ip(subnet_id, subnet.dhcp_address))
    txn.delete(keys.subnet(subnet_id))
    await quota.release(txn, subnet.meta.project_id, {"subnets": 1})
