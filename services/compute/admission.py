"""Admitting a boot: every reference of a CreateInstance checked against what its project may use.

`admit` turns the caller's requested shape into the record `instance.create`
writes: the request's own fields checked (validation), then the flavor (its
sizes copied), the image or boot volume, every network and port, the key pair
and the server group, each looked up for the instance's project. A reference
that does not exist, or belongs to a project the caller may not see, is
NOT_FOUND naming the field (``instance.networks[1].network_id``); one that
exists but cannot be used (a disabled flavor, an image still uploading, a
bound port) is INVALID_ARGUMENT or FAILED_PRECONDITION naming it. Other
services are asked with the service credential, and the project rule is
applied here.

The checks that ask other services run at once. Flavors, images, networks
and server groups read by id are kept for `RECENT_SECONDS` (found ones only;
the project rule is applied to each request anew): a burst of boots asks
once. The create's transaction reads the flavor again, compared at its
commit (`instance_batch`), and the build meets the real state of the rest
anyway (CreateRootDisk, CreatePort, SelectDestinations). Listings (the
default network, group names) are always read fresh: what they answer
decides the instance's shape.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nubis.compute.v1 import flavor_pb2, instance_pb2, instance_requests_pb2
from nubis.network.v1 import network_pb2, port_pb2, security_group_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import image_pb2, volume_pb2

from services.client import peers
from services.common import errors, policy, resources
from services.common.context import Principal
from services.common.store import Store
from services.compute import block_devices, keypair, validation
from services.compute import flavor as flavor_module

Instance = instance_pb2.Instance
Image = image_pb2.Image
T = TypeVar("T")
# Seconds a reference read for one boot serves the next ones.
RECENT_SECONDS = 2.0
_recent: dict[tuple[str, str], tuple[float, Any]] = {}
_reading: dict[tuple[str, str], asyncio.Future[Any]] = {}


async def _recently(kind: str, key: str, read: Callable[[], Awaitable[T]]) -> T:
    """`read()`, or what it answered for (kind, key) less than RECENT_SECONDS ago."""
    now = time.monotonic()
    kept = _recent.get((kind, key))
    if kept is not None and kept[0] > now:
        found: T = kept[1]
        return found
    reading = _reading.get((kind, key))
    if reading is None:  # one read for every boot asking meanwhile
        reading = _reading[(kind, key)] = asyncio.ensure_future(read())
        reading.add_done_callback(lambda _: _reading.pop((kind, key), None))
    value: T = await asyncio.shield(reading)
    if len(_recent) > 4096:
        _recent.clear()
    _recent[(kind, key)] = (time.monotonic() + RECENT_SECONDS, value)
    return value


def _missing(field: str, kind: str, ref: str) -> errors.NotFound:
    return errors.NotFound(f"{field}: {kind} {ref} not found",
                           metadata={"field": field, "id": ref})


def _unusable(field: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{field}: {why}",
                                  violations=[errors.FieldViolation(field, why)])


async def _flavor(store: Store, project_id: str, flavor_id: str) -> flavor_pb2.Flavor:
    """The flavor, if the project may boot it (public, or private with access, and ACTIVE).

    A flavor kept from a recent read that the project may not boot is read again
    before the create is refused: refusals are never of a stale flavor.
    """
    def read() -> Awaitable[flavor_pb2.Flavor]:
        return flavor_module.fetch(store, flavor_id, "flavor_id")

    try:
        try:
            return flavor_module.check_usable(await _recently("flavor", flavor_id, read),
                                              project_id, flavor_id)
        except (errors.NotFound, errors.FailedPrecondition):
            _recent.pop(("flavor", flavor_id), None)
            return flavor_module.check_usable(await _recently("flavor", flavor_id, read),
                                              project_id, flavor_id)
    except errors.NotFound:
        raise _missing("instance.flavor_id", "flavor", flavor_id) from None
    except errors.FailedPrecondition as exc:
        raise errors.FailedPrecondition(f"instance.flavor_id: {exc.message}", reason=exc.reason,
                                        metadata={**exc.metadata,
                                                  "field": "instance.flavor_id"}) from None


def _image_visible(image: Image, project_id: str) -> bool:
    if image.visibility == Image.VISIBILITY_PUBLIC or image.meta.project_id == project_id:
        return True
    return image.visibility == Image.VISIBILITY_SHARED and project_id in image.member_project_ids


async def _image(clients: peers.ServiceClients, project_id: str, image_id: str,
                 flavor: flavor_pb2.Flavor) -> Image:
    try:
        image = await _recently("image", image_id, lambda: clients.storage.GetImage(
            image_pb2.GetImageRequest(id=image_id)))
    except errors.NotFound:
        raise _missing("instance.image_id", "image", image_id) from None
    if not _image_visible(image, project_id):
        raise _missing("instance.image_id", "image", image_id)
    if image.state != Image.ACTIVE:
        raise _unusable("instance.image_id",
                        f"image {image_id} is {Image.State.Name(image.state)}, not ACTIVE")
    if image.min_ram_mb and flavor.ram_mb < image.min_ram_mb:
        raise _unusable("instance.flavor_id", f"the image needs at least {image.min_ram_mb} MiB")
    if flavor.disk_gb and image.min_disk_gb and flavor.disk_gb < image.min_disk_gb:
        raise _unusable("instance.flavor_id", f"the image needs at least {image.min_disk_gb} GiB")
    return image


async def _boot_volume(clients: peers.ServiceClients, project_id: str, volume_id: str) -> None:
    field = "instance.boot_volume_id"
    try:
        volume = await clients.storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
    except errors.NotFound:
        raise _missing(field, "volume", volume_id) from None
    if volume.meta.project_id != project_id:
        raise _missing(field, "volume", volume_id)
    if volume.state != volume_pb2.Volume.AVAILABLE:
        raise _unusable(field, f"volume {volume_id} is "
                        f"{volume_pb2.Volume.State.Name(volume.state)}, not AVAILABLE")


async def _network(clients: peers.ServiceClients, project_id: str, field: str,
                   network_id: str) -> None:
    try:
        net = await _recently("network", network_id, lambda: clients.network.GetNetwork(
            network_pb2.GetNetworkRequest(id=network_id)))
    except errors.NotFound:
        raise _missing(field, "network", network_id) from None
    if net.meta.project_id != project_id and not net.shared:
        raise _missing(field, "network", network_id)


async def _port(clients: peers.ServiceClients, project_id: str, field: str,
                port_id: str) -> None:
    try:
        port = await clients.network.GetPort(port_pb2.GetPortRequest(id=port_id))
    except errors.NotFound:
        raise _missing(field, "port", port_id) from None
    if port.meta.project_id != project_id:
        raise _missing(field, "port", port_id)
    if port.device_id:
        raise _unusable(field, f"port {port_id} is in use by {port.device_id}")


async def _listed_networks(clients: peers.ServiceClients, wanted: str) -> list[str]:
    listing = await clients.network.ListNetworks(network_pb2.ListNetworksRequest(
        page_size=1000, filter=wanted, all_projects=True))
    return [net.meta.id for net in listing.networks]


async def _default_network(clients: peers.ServiceClients, project_id: str) -> str:
    """The project's only network, else the one shared network (none or several: ask for one).

    The service lists every project's networks (``all_projects``) filtered to
    the instance's project, as it acts for that project.
    """
    own = await _listed_networks(clients, f"project_id={project_id} external=false")
    if len(own) == 1:
        return own[0]
    if own:
        raise _unusable("instance.networks", f"name a network or port: the project has "
                        f"{len(own)} networks to default to, not one")
    shared = await _listed_networks(clients, "shared=true")
    if len(shared) != 1:
        raise _unusable("instance.networks", f"name a network or port: the project has no "
                        f"network and there are {len(shared)} shared networks, not one")
    return shared[0]


async def _nics(clients: peers.ServiceClients, project_id: str, record: Instance) -> None:
    if not record.networks:
        record.networks.add(network_id=await _default_network(clients, project_id))
        return
    for index, nic in enumerate(record.networks):
        target = nic.WhichOneof("target")
        if target == "port_id":
            await _port(clients, project_id, f"instance.networks[{index}].port_id", nic.port_id)
        else:
            await _network(clients, project_id, f"instance.networks[{index}].network_id",
                           nic.network_id)


async def _group_ids(clients: peers.ServiceClients, project_id: str) -> dict[str, list[str]]:
    """The project's security groups: name -> ids."""
    listing = await clients.network.ListSecurityGroups(security_group_pb2.ListSecurityGroupsRequest(
        page_size=1000, filter=f"project_id={project_id}", all_projects=True))
    named: dict[str, list[str]] = {}
    for group in listing.security_groups:
        named.setdefault(group.meta.name, []).append(group.meta.id)
    return named


async def _security_groups(clients: peers.ServiceClients, project_id: str,
                           record: Instance) -> None:
    """Group ids kept for the ports, names resolved in the project; "default" dropped.

    A port that names no group gets the project's default. Network checks
    the ids when the build makes the ports; a bad id ends the build in ERROR
    at allocate_network.
    """
    chosen: list[str] = []
    named: dict[str, list[str]] | None = None
    for index, group in enumerate(record.security_groups):
        if group == "default" or resources.is_uuid(group):
            chosen.extend([] if group == "default" else [group])
            continue
        named = named if named is not None else await _group_ids(clients, project_id)
        ids = named.get(group, [])
        field = f"instance.security_groups[{index}]"
        if not ids:
            raise _missing(field, "security group", group)
        if len(ids) > 1:
            raise _unusable(field, f"{len(ids)} security groups are named {group!r}: give its id")
        chosen.append(ids[0])
    del record.security_groups[:]
    record.security_groups.extend(dict.fromkeys(chosen))


async def _key_pair(store: Store, principal: Principal, project_id: str, name: str) -> None:
    try:
        await keypair.for_boot(store, principal.user_id, project_id, name)
    except errors.NotFound:
        raise _missing("instance.key_name", "key pair", name) from None


async def _server_group(clients: peers.ServiceClients, project_id: str, group_id: str) -> None:
    field = "instance.server_group_id"
    try:
        group = await _recently("server_group", group_id, lambda: clients.scheduler.GetServerGroup(
            scheduler_pb2.GetServerGroupRequest(id=group_id)))
    except errors.NotFound:
        raise _missing(field, "server group", group_id) from None
    if group.meta.project_id != project_id:
        raise _missing(field, "server group", group_id)


_TARGET_NODE = "instance.scheduler_hints.target_node"


def _may_force_node(principal: Principal, sent: Instance) -> None:
    """A forced node (Nova's zone:host) is an operator's choice: refused before any lookup."""
    if sent.scheduler_hints.target_node and not policy.is_cloud_admin(principal):
        raise errors.PermissionDenied(
            f"{_TARGET_NODE}: only a cloud-admin may force the node of an instance",
            metadata={"field": _TARGET_NODE})


async def _target_node(clients: peers.ServiceClients, node: str) -> None:
    """The forced node exists."""
    field = _TARGET_NODE
    try:
        await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=node))
    except errors.NotFound:
        raise _missing(field, "node", node) from None


def _project(principal: Principal, requested: str) -> str:
    """The project the instance belongs to: the token's (a cloud-admin may name another)."""
    if requested and policy.is_cloud_admin(principal):
        return requested
    return principal.project_id


def _record(principal: Principal, sent: Instance, flavor: flavor_pb2.Flavor,
            project_id: str) -> Instance:
    record = Instance()
    record.CopyFrom(sent)
    for name in ("state", "power_state", "task_state", "task_id", "node", "fault", "addresses",
                 "port_ids", "volumes", "flavor", "migration", "root_volume_id",
                 "domain_name", "launched_time", "terminated_time", "user_id"):
        record.ClearField(name)
    record.meta.CopyFrom(resources.fresh_meta(sent.meta, project_id))
    record.state = Instance.BUILDING
    record.task_state = Instance.TASK_STATE_SCHEDULING
    record.power_state = Instance.POWER_STATE_NOSTATE
    record.user_id = principal.user_id
    record.hostname = record.hostname or validation.hostname_of(record.meta.name)
    record.flavor.CopyFrom(instance_pb2.FlavorSizes(
        flavor_id=flavor.meta.id, name=flavor.meta.name, vcpus=flavor.vcpus,
        ram_mb=flavor.ram_mb, disk_gb=flavor.disk_gb, ephemeral_gb=flavor.ephemeral_gb,
        swap_mb=flavor.swap_mb, extra_specs=dict(flavor.extra_specs)))
    return record


async def admit(store: Store, clients: peers.ServiceClients, principal: Principal,
                request: instance_requests_pb2.CreateInstanceRequest) -> Instance:
    """The BUILDING record for `request`, every reference checked; nothing written."""
    sent = request.instance
    validation.check_create(sent)
    _may_force_node(principal, sent)
    project_id = _project(principal, sent.meta.project_id)
    flavor = await _flavor(store, project_id, sent.flavor_id)
    record = _record(principal, sent, flavor, project_id)
    checks: list[Awaitable[Any]] = [
        _image(clients, project_id, sent.image_id, flavor) if sent.image_id
        else _boot_volume(clients, project_id, sent.boot_volume_id),
        _nics(clients, project_id, record),  # fills record.networks
        _security_groups(clients, project_id, record)]  # fills record.security_groups
    if sent.key_name:
        checks.append(_key_pair(store, principal, project_id, sent.key_name))
    if sent.server_group_id:
        checks.append(_server_group(clients, project_id, sent.server_group_id))
    if sent.block_devices:
        checks.append(block_devices.check(clients, project_id, sent))
    if sent.scheduler_hints.target_node:
        checks.append(_target_node(clients, sent.scheduler_hints.target_node))
    # At once; the first failure in the order above is the answer.
    for result in await asyncio.gather(*checks, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result
    return record
