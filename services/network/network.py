"""Networks: layer-2 segments, each with a VXLAN VNI that no other network holds.

A network is private to its project unless a cloud-admin makes it shared
(every project may put ports on it) or external (floating IPs and router
gateways come from it; every project sees it), as in Neutron. Its VNI is the
key ``network/segments/<vni>``, read (compared absent) and written in the
network's create transaction, so two networks can never share one; deleting
the network frees it in the same transaction.

Deleting a network with ports is refused (FAILED_PRECONDITION
``nubis.network.in_use``). So that a port created meanwhile cannot slip
through, the delete first marks the network DOWN/deleting with a compare on
its revision: a racing port create read the old revision and runs again,
then sees the mark and is refused.
"""

from __future__ import annotations

import random

from nubis.network.v1 import ipam_pb2, network_pb2, network_service_pb2

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.settings import NetworkSettings
from services.common.store import Store, Txn, Versioned
from services.network import keys, validation

Network = network_pb2.Network
UPDATABLE = ("name", "description", "labels", "mtu", "admin_state_up", "shared", "external")
_ADMIN_ONLY = ("shared", "external")
_STATES = Network.State.DESCRIPTOR
_PROVIDERS = Network.ProviderType.DESCRIPTOR
CREATE_METHOD = resources.method(network_service_pb2.DESCRIPTOR, "NetworkService",
                                 "CreateNetwork")
IN_USE = "nubis.network.in_use"
DELETING = "nubis.network.deleting"
# Label of the mark DeleteNetwork leaves while it checks for ports.
_DELETING_LABEL = "nubis.io/deleting"
_VNI_ATTEMPTS = 32


def is_admin(principal: Principal | None) -> bool:
    """Cloud-admins, nubis services (compute making a server's ports) and a server running
    without authentication act on every project."""
    return principal is None or policy.is_cloud_admin(principal) or policy.is_service(principal)


def visible(principal: Principal | None, net: Network) -> bool:
    """Own project's networks, shared and external ones, and everything for a cloud-admin."""
    if is_admin(principal) or net.shared or net.external:
        return True
    assert principal is not None
    return net.meta.project_id == principal.project_id


def usable(principal: Principal | None, net: Network) -> bool:
    """May the caller put ports (or subnets) on it: its own, shared ones, or as cloud-admin."""
    if is_admin(principal) or net.shared:
        return True
    assert principal is not None
    return net.meta.project_id == principal.project_id


def not_found(network_id: str) -> errors.NotFound:
    return errors.NotFound(f"network {network_id} not found", metadata={"network_id": network_id})


def deleting(net: Network) -> bool:
    return _DELETING_LABEL in net.meta.labels


def _with_revision(item: Versioned[Network]) -> Network:
    net = Network()
    net.CopyFrom(item.value)
    net.meta.revision = item.mod_revision
    return net


async def fetch(store: Store, network_id: str) -> Network:
    """The network with its revision; NotFound if absent (a malformed id is INVALID_ARGUMENT)."""
    resources.check_id(network_id, "id")
    found = await store.find(keys.network(network_id), Network)
    if found is None:
        raise not_found(network_id)
    return _with_revision(found)


async def get(store: Store, principal: Principal | None, network_id: str) -> Network:
    """A network the caller may see; another project's private one is NOT_FOUND."""
    net = await fetch(store, network_id)
    if not visible(principal, net):
        raise not_found(network_id)
    return net


async def in_txn(txn: Txn, principal: Principal | None, network_id: str, *,
                 field: str = "network_id") -> Network:
    """Inside a transaction: a network the caller may use, not being deleted."""
    resources.check_id(network_id, field)
    found = await txn.get(keys.network(network_id), Network)
    if found is None or not usable(principal, found.value):
        raise not_found(network_id)
    if deleting(found.value):
        raise errors.FailedPrecondition(f"network {network_id} is being deleted",
                                        reason=DELETING, metadata={"network_id": network_id})
    return found.value


def _validate(net: Network, principal: Principal | None, fields: tuple[str, ...],
              prefix: str = "network") -> None:
    violations = errors.ViolationCollector()
    if "name" in fields and net.meta.name:
        resources.check_name(violations, f"{prefix}.meta.name", net.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, f"{prefix}.meta.labels", dict(net.meta.labels))
        if _DELETING_LABEL in net.meta.labels:
            violations.add(f"{prefix}.meta.labels.{_DELETING_LABEL}", "reserved label")
    if "description" in fields and len(net.meta.description) > 1024:
        violations.add(f"{prefix}.meta.description", "at most 1024 characters")
    if "mtu" in fields:
        validation.check_mtu(violations, f"{prefix}.mtu", net.mtu)
    violations.check("invalid network")
    if not is_admin(principal):
        wanted = [name for name in _ADMIN_ONLY if name in fields and getattr(net, name)]
        if wanted:
            raise errors.PermissionDenied(
                f"only a cloud-admin may make a network {' or '.join(wanted)}",
                reason="nubis.policy.denied", metadata={"field": wanted[0]})


def _check_provider(net: Network, principal: Principal | None) -> None:
    violations = errors.ViolationCollector()
    kind = net.provider_type
    if kind not in (0, *filtering.enum_names(_PROVIDERS).values()):
        violations.add("network.provider_type", "unknown provider type")
    if kind == Network.PROVIDER_TYPE_BRIDGE and not net.provider_bridge:
        violations.add("network.provider_bridge", "a BRIDGE network names its host bridge")
    if net.provider_bridge and kind != Network.PROVIDER_TYPE_BRIDGE:
        violations.add("network.provider_bridge", "only for provider_type BRIDGE")
    violations.check("invalid network")
    if (kind == Network.PROVIDER_TYPE_BRIDGE or net.provider_bridge) and not is_admin(principal):
        raise errors.PermissionDenied("only a cloud-admin may bridge a network onto a host",
                                      reason="nubis.policy.denied",
                                      metadata={"field": "provider_type"})


def _new_network(request: Network, project_id: str, settings: NetworkSettings) -> Network:
    net = Network(
        meta=resources.fresh_meta(request.meta, project_id), state=Network.ACTIVE,
        mtu=request.mtu or settings.default_mtu, shared=request.shared, external=request.external,
        provider_type=request.provider_type or Network.PROVIDER_TYPE_ISOLATED,
        provider_bridge=request.provider_bridge, admin_state_up=True,
    )
    if not net.meta.name:
        net.meta.name = f"net-{net.meta.id[:8]}"
    return net


async def _allocate_vni(txn: Txn, settings: NetworkSettings, network_id: str) -> int:
    """A VNI no network holds: a random one in range whose key is absent (compared at commit)."""
    rng = random.Random()
    for _ in range(_VNI_ATTEMPTS):
        vni = rng.randint(settings.vni_min, settings.vni_max)
        if await txn.get(keys.segment(vni), ipam_pb2.SegmentAllocation) is None:
            txn.put(keys.segment(vni), ipam_pb2.SegmentAllocation(vni=vni, network_id=network_id))
            return vni
    raise errors.ResourceExhausted("no free VXLAN segment found", reason="nubis.network.no_vni")


async def create(store: Store, settings: NetworkSettings, principal: Principal | None,
                 request: network_pb2.CreateNetworkRequest, project_id: str) -> Network:
    """A new ACTIVE network with its own VNI, counted in the project's `networks` quota."""
    _validate(request.network, principal, UPDATABLE)
    _check_provider(request.network, principal)
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    net = _new_network(request.network, project_id, settings)
    if request.validate_only:
        net.meta.id = ""
        return net

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        net.segmentation_id = await _allocate_vni(txn, settings, net.meta.id)
        await quota.reserve(txn, project_id, {"networks": 1})
        txn.create(keys.network(net.meta.id), net)
        await requests.remember(txn, idempotency, net.meta.id)
        return net.meta.id

    return await fetch(store, await store.atomic(body))


def network_filter(text: str, *, admin: bool) -> filtering.Filter:
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(filtering.enum_names(_STATES)),
        "shared": frozenset({"true", "false"}), "external": frozenset({"true", "false"}),
        "provider_type": frozenset(filtering.enum_names(_PROVIDERS)),
    }
    if admin:
        keys_["project_id"] = None
    return filtering.parse(text, keys_)


def _fields(net: Network) -> dict[str, str]:
    return {"name": net.meta.name, "project_id": net.meta.project_id,
            "state": filtering.enum_name(_STATES, net.state),
            "shared": str(net.shared).lower(), "external": str(net.external).lower(),
            "provider_type": filtering.enum_name(_PROVIDERS, net.provider_type)}


async def list_networks(
    store: Store, principal: Principal | None, scope: str | None, page_size: int,
    page_token: str, wanted: filtering.Filter,
) -> tuple[list[Network], str]:
    """Networks of `scope` (None: every project) plus shared and external ones, by id."""
    size = pages.page_size(page_size)

    def keep(item: Versioned[Network]) -> bool:
        net = item.value
        mine = scope is None or net.meta.project_id == scope or net.shared or net.external
        return mine and visible(principal, net) and wanted.matches(_fields(net), net.meta.labels)

    found, token = await pages.filtered_page(store, keys.NETWORKS, Network, keep, size=size,
                                             page_token=page_token)
    return [_with_revision(item) for item in found], token


async def update(store: Store, principal: Principal | None,
                 request: network_pb2.UpdateNetworkRequest) -> Network:
    """Change the masked fields; shared and external only for cloud-admins."""
    fields = tuple(resources.check_mask(request.update_mask.paths, UPDATABLE))
    _validate(request.network, principal, fields)
    network_id = request.network.meta.id
    current = await get(store, principal, network_id)
    if not usable(principal, current):
        raise not_found(network_id)
    expected = request.network.meta.revision

    def mutate(net: Network) -> Network:
        if expected and net.meta.revision != expected:
            raise errors.Conflict("network changed since it was read",
                                  metadata={"network_id": network_id})
        _apply(net, request.network, fields)
        return net

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.network(network_id), Network)
        if found is None:
            raise not_found(network_id)
        net = found.value
        net.meta.revision = found.mod_revision
        mutate(net)
        net.meta.revision = 0
        net.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.network(network_id), net)

    await store.atomic(body)
    return await fetch(store, network_id)


def _apply(net: Network, given: Network, fields: tuple[str, ...]) -> None:
    for name in fields:
        if name in ("name", "description"):
            setattr(net.meta, name, getattr(given.meta, name))
        elif name == "labels":
            net.meta.labels.clear()
            net.meta.labels.update(given.meta.labels)
        elif name == "mtu":
            net.mtu = given.mtu or net.mtu
        else:
            setattr(net, name, getattr(given, name))
    net.state = Network.ACTIVE if net.admin_state_up else Network.DOWN


async def _mark(store: Store, network_id: str, revision: int, on: bool) -> int:
    """Set (or clear) the deleting mark; returns the network's new revision."""
    async def body(txn: Txn) -> int:
        found = await txn.get(keys.network(network_id), Network)
        if found is None:
            raise not_found(network_id)
        if revision and on and found.mod_revision != revision:
            raise errors.Conflict("network changed since it was read",
                                  metadata={"network_id": network_id})
        net = found.value
        if on:
            net.meta.labels[_DELETING_LABEL] = "true"
        else:
            net.meta.labels.pop(_DELETING_LABEL, None)
        txn.put(keys.network(network_id), net)
        return found.mod_revision

    await store.atomic(body)
    return (await store.get(keys.network(network_id), Network)).mod_revision


async def delete(store: Store, principal: Principal | None,
                 request: network_pb2.DeleteNetworkRequest) -> None:
    """Delete the network, its subnets and their DHCP addresses; free its VNI and quota.

    Refused while it has ports; `force` (cloud-admin) deletes its unbound
    ports first, and bound ones still refuse it.
    """
    net = await get(store, principal, request.id)
    if not usable(principal, net):
        raise not_found(request.id)
    if request.force and not is_admin(principal):
        raise errors.PermissionDenied("force needs the cloud-admin role",
                                      reason="nubis.policy.denied", metadata={"field": "force"})
    marked = await _mark(store, net.meta.id, request.revision, True)
    try:
        refs, _ = await store.list_all(keys.network_ports(net.meta.id), ipam_pb2.PortRef)
        blocking = [ref.value for ref in refs if not request.force or ref.value.node]
        if blocking:
            raise errors.FailedPrecondition(
                f"network {net.meta.id} still has {len(blocking)} port(s)", reason=IN_USE,
                metadata={"network_id": net.meta.id, "ports": str(len(blocking))})
        await _remove(store, net.meta.id, marked, [ref.value.port_id for ref in refs])
    except BaseException:
        await _mark(store, net.meta.id, 0, False)
        raise


async def _remove(store: Store, network_id: str, revision: int, unbound_ports: list[str]) -> None:
    """One transaction: the network, its subnets, their addresses, the given unbound ports."""
    # Imported here: ports and subnets depend on networks, not the other way round.
    from services.network import port as port_module
    from services.network import subnet as subnet_module

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.network(network_id), Network)
        if found is None:
            raise not_found(network_id)
        if found.mod_revision != revision:
            raise errors.Conflict("network changed while it was being deleted",
                                  metadata={"network_id": network_id})
        net = found.value
        for port_id in unbound_ports:
            await port_module.remove_in_txn(txn, port_id)
        for subnet_id in net.subnet_ids:
            await subnet_module.remove_in_txn(txn, subnet_id)
        txn.delete(keys.segment(net.segmentation_id))
        txn.delete(keys.network(network_id))
        txn.delete(keys.attachments(network_id))
        await quota.release(txn, net.meta.project_id, {"networks": 1})

    await store.atomic(body)

