"""The steps every move of an instance between nodes shares: resize, cold migration, evacuation.

A move claims the destination with the scheduler's MoveAllocations (the
source's claim stays until the move is confirmed or undone, so both nodes
count exactly what they hold at every step), makes a root disk in the
destination's pool, binds the instance's ports there and spawns the domain.

Disks are local to their node's pool and storage copies no volume between
nodes, so the destination's root disk is made afresh from the instance's
image, as Nova's evacuate does on local storage: what the guest wrote to its
old root disk stays on the source (and is deleted on confirm). The disk of a
move is keyed in storage by the move's operation id (CreateRootDisk is
idempotent per key), so a move run again after an adoption gets the same disk.
Data volumes and boot volumes live on one node and attach only there, so an
instance with any is refused a move (detach them first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import flavor_pb2, instance_pb2
from nubis.network.v1 import port_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import attachment_pb2, volume_pb2

from services.common import errors, quota, tasks
from services.common.context import Principal
from services.common.store import Txn
from services.compute import instance as instance_module
from services.compute import kernel_boot, operation
from services.compute.operation import Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
FlavorSizes = instance_pb2.FlavorSizes
Volume = volume_pb2.Volume
Resources = scheduler_pb2.Resources

LOCAL_VOLUMES = "nubis.instance.local_volumes"
NO_IMAGE = "nubis.instance.no_image"
NO_NODE = "nubis.instance.no_node"
DISK_FAILED = "nubis.instance.disk_failed"
DEVICE_OWNER = "compute:nova"
SHUTDOWN_TIMEOUT = 60
"""Seconds the source's guest gets for a clean shutdown before a move forces it (Nova's 60)."""
TRAIT_PREFIX = "trait:"
ROOT_DEVICE = "vda"
MOVE_ROOT = "move_root"
"""Progress key: the root disk a move made on its destination."""


def resources_of(sizes: FlavorSizes) -> Resources:
    """What a flavor claims on a node, as a build claims it: vCPUs, memory, root disk."""
    return Resources(vcpus=sizes.vcpus, memory_mb=sizes.ram_mb, disk_gb=max(1, sizes.disk_gb))


def traits_of(sizes: FlavorSizes, wanted: str) -> list[str]:
    """The traits a flavor's extra specs mark `wanted` ("required" or "forbidden")."""
    return sorted(key[len(TRAIT_PREFIX):] for key, value in sizes.extra_specs.items()
                  if key.startswith(TRAIT_PREFIX) and value == wanted)


def spec_of(found: Instance, sizes: FlavorSizes) -> scheduler_pb2.RequestSpec:
    """The placement constraints of the instance with `sizes` (the scheduler avoids the source)."""
    return scheduler_pb2.RequestSpec(
        resources=resources_of(sizes), count=1, consumer_ids=[found.meta.id],
        project_id=found.meta.project_id, required_traits=traits_of(sizes, "required"),
        forbidden_traits=traits_of(sizes, "forbidden"),
        availability_zone=found.availability_zone, server_group_id=found.server_group_id)


def check_movable(found: Instance, verb: str) -> None:
    """FailedPrecondition unless the instance can move: placed, from an image, no volumes."""
    if not found.node:
        raise errors.FailedPrecondition(
            f"instance {found.meta.id} was never placed on a node; {verb} needs one",
            reason=NO_NODE, metadata={"id": found.meta.id, "verb": verb})
    if found.boot_volume_id or not found.image_id:
        raise errors.FailedPrecondition(
            f"instance {found.meta.id} boots from volume {found.boot_volume_id}, which lives in "
            f"a pool of node {found.node} and attaches only there: {verb} cannot move it",
            reason=LOCAL_VOLUMES, metadata={"id": found.meta.id, "volume_id": found.boot_volume_id})
    data = [item.volume_id for item in found.volumes if not item.boot]
    if data:
        raise errors.FailedPrecondition(
            f"instance {found.meta.id} has volumes attached ({', '.join(data)}) that live on "
            f"node {found.node} and attach only there: detach them before {verb}",
            reason=LOCAL_VOLUMES, metadata={"id": found.meta.id, "volume_ids": ",".join(data)})


def sizes_of(flavor: flavor_pb2.Flavor) -> FlavorSizes:
    """The sizes of a flavor as an instance keeps them."""
    return FlavorSizes(flavor_id=flavor.meta.id, name=flavor.meta.name, vcpus=flavor.vcpus,
                       ram_mb=flavor.ram_mb, disk_gb=flavor.disk_gb,
                       ephemeral_gb=flavor.ephemeral_gb, swap_mb=flavor.swap_mb,
                       extra_specs=dict(flavor.extra_specs))


def growth(old: FlavorSizes, new: FlavorSizes) -> dict[str, int]:
    """Quota a move from `old` to `new` needs beyond what the instance holds (never negative)."""
    return {"vcpus": max(new.vcpus - old.vcpus, 0), "ram_mb": max(new.ram_mb - old.ram_mb, 0)}


def root_of(found: Instance) -> instance_pb2.AttachedVolume:
    """The instance's root disk attachment (its boot entry in `volumes`)."""
    for item in found.volumes:
        if item.boot or item.volume_id == found.root_volume_id:
            return item
    return instance_pb2.AttachedVolume(volume_id=found.root_volume_id, device_name=ROOT_DEVICE,
                                       boot=True, delete_on_termination=True)


def set_root(found: Instance, root: instance_pb2.AttachedVolume) -> None:
    """Make `root` the instance's root disk, in `root_volume_id` and first in `volumes`."""
    others = [item for item in found.volumes if not item.boot
              and item.volume_id != found.root_volume_id]
    del found.volumes[:]
    found.volumes.append(root)
    found.volumes.extend(others)
    found.root_volume_id = root.volume_id


async def start(runner: Runner, principal: Principal, instance_id: str, kind: int, *,
                action: str, allowed: Callable[[Instance], None],
                mutate: Callable[[Instance], None], params: Operation,
                reserve: Callable[[Instance], dict[str, int]] | None = None) -> Instance:
    """Begin a move in one transaction: checks, new state, quota it grows by, operation, action.

    `reserve(instance)` (read before `mutate`) is the quota the move takes
    beyond what the instance holds; it is reserved in the same transaction.
    """

    async def body(txn: Txn) -> operation.Started:
        found = (await instance_module.in_txn(txn, instance_id)).value
        if found.task_id:
            raise operation.busy(found)
        allowed(found)
        amounts = reserve(found) if reserve is not None else {}
        mutate(found)
        if any(amounts.values()):
            await quota.reserve(txn, found.meta.project_id, amounts)
        return await runner.record(txn, found, kind, action_name=action, principal=principal,
                                   params=params)

    found = await instance_module.visible(runner.store, principal, instance_id)
    async with runner.turn(found.value.meta.project_id):
        started = await runner.store.atomic(body, deadline=operation.patience())
    runner.start(started.op)
    return started.instance


async def return_quota(txn: Txn, project_id: str, amounts: dict[str, int]) -> None:
    """Give quota back in a finishing transaction (nothing to give: no write)."""
    if any(amounts.values()):
        await quota.release(txn, project_id, amounts)


def transient(exc: errors.NubisError) -> bool:
    """etcd, the broker or a peer service out of reach: run the step again later.

    A node that stopped answering (`operation.NODE_UNAVAILABLE`) is a failure of
    the move, not a pause.
    """
    return (isinstance(exc, errors.Unavailable) and exc.reason != operation.NODE_UNAVAILABLE) \
        or isinstance(exc, operation.Superseded)


def fault_of(verb: str, exc: errors.NubisError) -> operation.Fault:
    return operation.fault(exc.reason or operation.FAILED, f"{verb} failed: {exc.message}")


# --- allocations ----------------------------------------------------------------

async def allocations(runner: Runner, consumer_id: str) -> scheduler_pb2.ConsumerAllocations:
    """The consumer's allocations (none: an empty record)."""
    try:
        return await runner.clients.scheduler.GetAllocations(
            scheduler_pb2.GetAllocationsRequest(consumer_id=consumer_id))
    except errors.NotFound:
        return scheduler_pb2.ConsumerAllocations(consumer_id=consumer_id)


async def claim(runner: Runner, found: Instance, source: str, sizes: FlavorSizes,
                target: str = "") -> str:
    """Claim `sizes` on a destination (the scheduler's choice, or `target`), keeping the source.

    A claim a lost reply already made (two allocations held) is found and
    returned, so a move run again does not claim twice.
    """
    held = await allocations(runner, found.meta.id)
    others = [item.node_name for item in held.allocations if item.node_name != source]
    if others:
        return others[0]
    moved = await runner.clients.scheduler.MoveAllocations(scheduler_pb2.MoveAllocationsRequest(
        consumer_id=found.meta.id, target_node=target, resources=resources_of(sizes),
        spec=spec_of(found, sizes)))
    return next(item.node_name for item in moved.allocations if item.node_name != source)


async def release_on(runner: Runner, consumer_id: str, node: str) -> None:
    """Give back the consumer's allocation on `node` (none there: nothing to do)."""
    with contextlib.suppress(errors.NotFound):
        await runner.clients.scheduler.ReleaseAllocations(
            scheduler_pb2.ReleaseAllocationsRequest(consumer_id=consumer_id, node_name=node))


async def release_except(runner: Runner, consumer_id: str, keep: str) -> None:
    """Give back every allocation of the consumer on a node other than `keep`."""
    held = await allocations(runner, consumer_id)
    for item in held.allocations:
        if item.node_name != keep:
            await release_on(runner, consumer_id, item.node_name)


# --- domains --------------------------------------------------------------------

async def power_off(runner: Runner, op: Operation, node: str) -> None:
    """Shut the instance's domain on `node` down (a missing domain runs nothing: done)."""
    request = tasks_pb2.PowerOffRequest(name=instance_module.domain_name(op.instance_id),
                                        timeout_seconds=SHUTDOWN_TIMEOUT)
    with contextlib.suppress(errors.NotFound):
        await runner.send(op, tasks.POWER_OFF, request, node=node)


async def destroy(runner: Runner, op: Operation, node: str) -> None:
    """Stop and undefine the instance's domain on `node` (already gone: done)."""
    await runner.send(op, tasks.DESTROY,
                      tasks_pb2.DestroyRequest(name=instance_module.domain_name(op.instance_id)),
                      node=node)


async def power_on(runner: Runner, op: Operation, node: str) -> bool:
    """Start the domain left on `node`; False if it is gone (the caller spawns it again)."""
    try:
        await runner.send(op, tasks.POWER_ON, tasks_pb2.DomainRequest(
            name=instance_module.domain_name(op.instance_id)), node=node)
    except errors.NotFound:
        return False
    return True


async def domain_spec(storage: Any, found: Instance, sizes: FlavorSizes,
                      disk: attachment_pb2.DiskConnection, volume_id: str,
                      ports: list[port_pb2.Port]) -> tasks_pb2.DomainSpec:
    """The domain of the instance with `sizes`, booting from `disk`, with `ports` as its NICs.

    An instance of a kernel-boot image keeps its kernel, ramdisk and command
    line (asked of `storage`, compute's StorageService client, as a build does).
    """
    spec = tasks_pb2.DomainSpec(
        name=instance_module.domain_name(found.meta.id), uuid=found.meta.id,
        vcpus=sizes.vcpus, memory_mb=sizes.ram_mb, project_id=found.meta.project_id,
        hostname=found.hostname or found.meta.name)
    boot = await kernel_boot.of_image(storage, found.image_id)
    if boot is not None:
        spec.kernel_boot.CopyFrom(boot)
    spec.disks.add(volume_id=volume_id, path=disk.path, format=disk.format or "qcow2",
                   target_dev=ROOT_DEVICE, bus="virtio", boot=True)
    for port in ports:
        spec.interfaces.add(port_id=port.meta.id, mac=port.mac_address,
                            network_id=port.network_id,
                            filterref_xml=port.binding_details.get("filterref_xml", ""))
    return spec


async def spawn(runner: Runner, op: Operation, spec: tasks_pb2.DomainSpec, node: str, *,
                stopped: bool) -> tasks_pb2.DomainStatus:
    """Define and start the domain on `node`; powered off again if the instance was STOPPED."""
    status = await runner.send(op, tasks.SPAWN, tasks_pb2.SpawnRequest(domain=spec), node=node)
    if stopped:
        status = await runner.send(op, tasks.POWER_OFF, tasks_pb2.PowerOffRequest(
            name=spec.name, timeout_seconds=0), node=node)
    return status


# --- disks ----------------------------------------------------------------------

async def make_disk(runner: Runner, op: Operation, found: Instance, node: str,
                    sizes: FlavorSizes) -> Volume:
    """The move's root disk on `node`, from the instance's image (the same one if asked again)."""
    return await runner.clients.storage.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
        instance_id=op.id, project_id=found.meta.project_id, image_id=found.image_id,
        node=node, size_gb=max(sizes.disk_gb, 1), request_id=f"{op.id}-root-{node}"))


async def new_disk(runner: Runner, op: Operation, found: Instance, node: str) -> str:
    """Make the move's root disk on `node` and record it (the instance's
    `migration.destination_root_volume_id`, the operation's progress); its id.

    A delete that takes the operation over finds it in the progress; one that
    supersedes it before the record was written never learns of it, so the
    disk is deleted here.
    """
    disk = await make_disk(runner, op, found, node, found.flavor)
    op.progress[MOVE_ROOT] = disk.meta.id

    def made(record: Instance) -> None:
        record.migration.destination_root_volume_id = disk.meta.id

    try:
        await runner.step(op, op.step, mutate=made)
    except operation.Superseded:
        await drop_disk(runner, disk.meta.id)
        raise
    return disk.meta.id


async def wait_available(runner: Runner, volume_id: str) -> Volume:
    """Poll the disk until storage made it (AVAILABLE or beyond); its fault if it failed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + runner.settings.volume_wait_timeout
    pause = 0.05
    while True:
        found = await runner.clients.storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
        if found.state == Volume.ERROR:
            raise errors.FailedPrecondition(
                f"root disk {volume_id} failed: {found.fault.message or 'no reason given'}",
                reason=DISK_FAILED, metadata={"volume_id": volume_id})
        if found.state != Volume.CREATING:
            return found
        if loop.time() > deadline:
            raise errors.FailedPrecondition(
                f"root disk {volume_id} was not made within "
                f"{runner.settings.volume_wait_timeout:.0f} s", reason=DISK_FAILED,
                metadata={"volume_id": volume_id})
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


async def attach_root(runner: Runner, instance_id: str, volume_id: str,
                      node: str) -> attachment_pb2.VolumeAttachment:
    """Reserve, begin and complete the attachment of a root disk; a repeat goes on from
    the step the attachment reached."""
    storage = runner.clients.storage
    Attachment = attachment_pb2.VolumeAttachment
    found = await storage.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
        volume_id=volume_id, instance_id=instance_id, node=node))
    if found.state == Attachment.RESERVED:
        found = await storage.BeginAttach(attachment_pb2.BeginAttachRequest(
            attachment_id=found.meta.id, device_name=ROOT_DEVICE))
    if found.state == Attachment.ATTACHING:
        found = await storage.CompleteAttach(
            attachment_pb2.CompleteAttachRequest(attachment_id=found.meta.id))
    return found


async def connection_of(runner: Runner, attachment_id: str) -> attachment_pb2.DiskConnection:
    """Where an attached disk is on its node."""
    found = await runner.clients.storage.GetVolumeAttachment(
        attachment_pb2.GetVolumeAttachmentRequest(id=attachment_id))
    return found.connection


async def drop_disk(runner: Runner, volume_id: str) -> None:
    """Detach a root disk from everything and delete it (already gone: done).

    A disk still being made is waited for first: storage deletes only
    AVAILABLE or ERROR volumes.
    """
    storage = runner.clients.storage
    try:
        found = await storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
        if found.state == Volume.DELETING:
            return
        if found.state == Volume.CREATING:
            with contextlib.suppress(errors.FailedPrecondition):  # ERROR: deletable as it is
                await wait_available(runner, volume_id)
        for ref in found.attachments:
            with contextlib.suppress(errors.NotFound):
                await storage.CompleteDetach(
                    attachment_pb2.CompleteDetachRequest(attachment_id=ref.attachment_id))
        await storage.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=volume_id))
    except errors.NotFound:
        pass


# --- ports ----------------------------------------------------------------------

async def bind_ports(runner: Runner, found: Instance, node: str) -> list[port_pb2.Port]:
    """Bind every port of the instance to `node` (moving it there); the bound ports, in order."""
    bound = []
    for port_id in found.port_ids:
        bound.append(await runner.clients.network.BindPort(port_pb2.BindPortRequest(
            id=port_id, node=node, device_id=found.meta.id, device_owner=DEVICE_OWNER)))
    return bound


# --- what a delete in the middle of a move must also remove --------------------

def leftover_nodes(op: Operation, found: Instance) -> list[str]:
    """Nodes other than `op.node` where a move (in flight or awaiting confirmation) may
    have left the instance's domain."""
    named = (found.node, found.migration.source_node, found.migration.destination_node)
    return sorted({node for node in named if node and node != op.node})


def leftover_disks(op: Operation, found: Instance) -> list[str]:
    """Root disks a move made or left besides `found.root_volume_id`: the source's, the
    destination's (recorded in the instance or only in the operation's progress)."""
    named = (found.migration.source_root.volume_id, found.migration.destination_root_volume_id,
             op.progress.get(MOVE_ROOT, ""))
    return sorted({disk for disk in named if disk and disk != found.root_volume_id})


async def remove_leftovers(runner: Runner, op: Operation, found: Instance) -> None:
    """For a delete: the domains and root disks a move left beyond `op.node` and the
    instance's root volume (those the teardown removes itself).

    Allocations need nothing here: releasing the consumer releases them on
    every node. Quota needs nothing either: `instance.usage` counts the larger
    flavor while a resize awaits its outcome.
    """
    for node in leftover_nodes(op, found):
        try:
            await destroy(runner, op, node)
        except errors.NubisError as exc:  # a dead node keeps its domain; reconcile reports it
            if transient(exc):
                raise
            log.warning("could not destroy the domain a move left", node=node,
                        instance_id=found.meta.id, error=exc.message)
    for volume_id in leftover_disks(op, found):
        await drop_disk(runner, volume_id)
