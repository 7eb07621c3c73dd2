"""The BUILD operation: schedule, wire, make disks, spawn; reschedule; else ERROR with a fault.

Steps, each recorded in the operation before the next starts (so a replica
that adopts the build goes on from the last one):

- SCHEDULING: the scheduler selects and claims a node (the flavor's sizes
  and traits, the zone, the server group, avoiding nodes the build already
  failed on).
- NETWORKING: a port per NIC (request ids derived from the operation id, so
  a repeat makes no second port; ports are kept across reschedules), bound on
  the node. The root disk is asked for at the same time (CreateRootDisk, its
  id recorded with the ports'), so storage makes it while the ports are bound.
- BLOCK_DEVICE_MAPPING: the root disk from the image in the node's pool (or
  the boot volume), waited for, reserved and attached for the instance.
- SPAWNING: `spawn` to the node's agent, which defines and starts the domain.

An attempt that fails on its node gives back what it took there (domain,
root disk, bindings, claim) and is rescheduled, up to `build_retries` times;
then, or when no node fits, the instance goes to ERROR with a fault naming
the step and the reason, its ports deleted and its quota given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2
from nubis.network.v1 import port_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import attachment_pb2, volume_pb2

from services.common import errors, resources, tasks
from services.compute import block_devices, instance, kernel_boot, move, operation, teardown

log = structlog.get_logger(__name__)
T = TypeVar("T")

Instance = instance_pb2.Instance
Operation = operation.Operation
TaskState = Instance.TaskState
BUILD_FAILED = "nubis.instance.build_failed"
NO_VALID_HOST = "nubis.instance.no_valid_host"
DEVICE_OWNER = "compute:nova"
# Progress keys: the last attempt's failure (a reschedule that finds no node reports it).
LAST_FAULT = "last_fault"
LAST_REASON = "last_reason"
# A root disk in these states is made (and perhaps already reserved by this build).
_READY = (volume_pb2.Volume.AVAILABLE, volume_pb2.Volume.RESERVED, volume_pb2.Volume.ATTACHING,
          volume_pb2.Volume.IN_USE)
# A root disk in these states has begun attaching (storage set its connection).
_BEGUN = (volume_pb2.Volume.ATTACHING, volume_pb2.Volume.IN_USE)
_ATTACHMENT_BEGUN = (attachment_pb2.VolumeAttachment.ATTACHING,
                     attachment_pb2.VolumeAttachment.ATTACHED)
ROOT_DEVICE = move.ROOT_DEVICE
_STEP_NAMES = {
    TaskState.TASK_STATE_SCHEDULING: "schedule",
    TaskState.TASK_STATE_NETWORKING: "allocate_network",
    TaskState.TASK_STATE_BLOCK_DEVICE_MAPPING: "block_device_mapping",
    TaskState.TASK_STATE_SPAWNING: "spawn",
}


class _AttemptFailed(Exception):
    """This attempt cannot finish on its node; `reschedule` says whether another may."""

    def __init__(self, step: int, cause: errors.NubisError, *, reschedule: bool = True) -> None:
        super().__init__(cause.message)
        self.step, self.cause, self.reschedule = step, cause, reschedule

    def fault(self, node: str) -> operation.Fault:
        if self.step == TaskState.TASK_STATE_SCHEDULING and "; no other node" in self.cause.message:
            return operation.fault(self.cause.reason or BUILD_FAILED, self.cause.message)
        where = f" on node {node}" if node else ""
        name = _STEP_NAMES.get(self.step, "build")  # type: ignore[call-overload]
        return operation.fault(self.cause.reason or BUILD_FAILED,
                               f"build failed at {name}{where}: {self.cause.message}")


def _traits(record: Instance) -> tuple[list[str], list[str]]:
    """Flavor extra specs ``trait:NAME=required|forbidden`` as placement traits."""
    required: list[str] = []
    forbidden: list[str] = []
    for key, value in record.flavor.extra_specs.items():
        if key.startswith("trait:"):
            (required if value == "required" else forbidden).append(key[len("trait:"):])
    return required, forbidden


async def _all_nodes(runner: operation.Runner) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page = await runner.clients.scheduler.ListNodes(
            scheduler_pb2.ListNodesRequest(page_size=1000, page_token=token))
        names.extend(node.name for node in page.nodes)
        token = page.next_page_token
        if not token:
            return names


async def _avoided(runner: operation.Runner, op: Operation, record: Instance) -> list[str]:
    """Nodes the scheduler may not choose: those the build failed on, and every node but the
    one the instance is pinned to: an operator's `scheduler_hints.target_node` (Nova's
    zone:host; the filters still run), or the boot volume's node (local storage: the disk
    cannot move).

    RequestSpec names no node, so the pin is the complement of the node.
    """
    avoid = list(op.failed_nodes)
    pins = {record.scheduler_hints.target_node} - {""}
    if record.boot_volume_id:
        volume = await runner.clients.storage.GetVolume(
            volume_pb2.GetVolumeRequest(id=record.boot_volume_id))
        pins |= {volume.node} - {""}
    pins |= await block_devices.pins(runner, record)
    if pins:  # two different pins: no node fits
        avoid.extend(name for name in await _all_nodes(runner)
                     if (name not in pins or len(pins) > 1) and name not in avoid)
    return avoid


async def _schedule(runner: operation.Runner, op: Operation, record: Instance) -> Instance:
    required, forbidden = _traits(record)
    spec = scheduler_pb2.RequestSpec(
        resources=scheduler_pb2.Resources(vcpus=record.flavor.vcpus,
                                          memory_mb=record.flavor.ram_mb,
                                          disk_gb=max(1, record.flavor.disk_gb)),
        count=1, consumer_ids=[record.meta.id], project_id=record.meta.project_id,
        required_traits=required, forbidden_traits=forbidden,
        availability_zone=record.availability_zone, server_group_id=record.server_group_id,
        avoid_nodes=await _avoided(runner, op, record))
    try:
        reply = await runner.clients.scheduler.SelectDestinations(
            scheduler_pb2.SelectDestinationsRequest(spec=spec))
    except (errors.ResourceExhausted, errors.NotFound, errors.FailedPrecondition,
            errors.InvalidArgument) as exc:
        earlier = op.progress.get(LAST_FAULT, "")
        if earlier:  # a reschedule that found no other node: the failure that made it counts
            exc = type(exc)(f"{earlier}; no other node to reschedule to ({exc.message})",
                            reason=op.progress.get(LAST_REASON) or exc.reason)
        raise _AttemptFailed(TaskState.TASK_STATE_SCHEDULING, exc, reschedule=False) from exc
    node = reply.destinations[0].node_name

    def placed(found: Instance) -> None:
        found.node = node

    return await runner.step(op, TaskState.TASK_STATE_NETWORKING, mutate=placed,
                             event="allocate_network", node=node)


def port_request(op: Operation, record: Instance, index: int) -> port_pb2.CreatePortRequest:
    """The CreatePort of NIC `index`: the same for every try of this build."""
    nic = record.networks[index]
    port = port_pb2.Port(network_id=nic.network_id, device_owner=DEVICE_OWNER,
                         device_id=record.meta.id,
                         security_group_ids=[g for g in record.security_groups
                                             if resources.is_uuid(g)])
    port.meta.project_id = record.meta.project_id
    port.meta.name = f"{record.meta.name}-{index}"[:63]
    if nic.fixed_ip:
        port.fixed_ips.add(ip_address=nic.fixed_ip)
    return port_pb2.CreatePortRequest(port=port, request_id=f"{op.id}.port.{index}")


async def _create_port(runner: operation.Runner, op: Operation, record: Instance,
                       index: int) -> port_pb2.Port:
    """NIC `index`'s port; a refusal (a bad group, no address left) is no node's fault."""
    try:
        return await runner.clients.network.CreatePort(port_request(op, record, index))
    except errors.Unavailable:
        raise
    except errors.NubisError as exc:
        raise _AttemptFailed(TaskState.TASK_STATE_NETWORKING, exc, reschedule=False) from exc


async def _port_id(runner: operation.Runner, op: Operation, record: Instance,
                   index: int) -> None:
    key = teardown.port_key(index)
    if key in op.progress:
        return
    if teardown.created_port(record, index):
        op.progress[key] = (await _create_port(runner, op, record, index)).meta.id
    else:
        op.progress[key] = record.networks[index].port_id


async def _ask_root_disk_early(runner: operation.Runner, op: Operation,
                               record: Instance) -> None:
    """The root disk asked for while the ports are bound; a refusal is met at its own step."""
    try:
        await _ask_root_disk(runner, op, record)
    except errors.NubisError as exc:
        log.info("root disk not asked for yet", instance_id=record.meta.id, error=exc.message)


async def _ask_root_disk(runner: operation.Runner, op: Operation, record: Instance) -> None:
    """CreateRootDisk for this attempt (once; storage makes it in the background), made
    reserved for the instance as vda: its attachment is recorded with it."""
    if record.boot_volume_id or op.progress.get(teardown.ROOT):
        return
    made = await runner.clients.storage.CreateRootDisk(volume_pb2.CreateRootDiskRequest(
        instance_id=record.meta.id, project_id=record.meta.project_id,
        image_id=record.image_id, node=op.node, size_gb=max(1, record.flavor.disk_gb),
        request_id=f"{op.id}.root.{op.attempt}", device_name=ROOT_DEVICE))
    op.progress[teardown.ROOT] = made.meta.id
    for ref in made.attachments:
        if ref.instance_id == record.meta.id:
            op.progress[teardown.ATTACHMENT] = ref.attachment_id


async def _gather(*steps: Awaitable[T]) -> list[T]:
    """Run `steps` at once; the first failure (in order) is raised once all are done."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


async def _wire(runner: operation.Runner, op: Operation,
                record: Instance) -> tuple[Instance, dict[str, port_pb2.Port]]:
    """Ports made and bound at once (and the root disk asked for); one record of them."""
    network = runner.clients.network
    before = dict(op.progress)
    try:
        await _gather(_ask_root_disk_early(runner, op, record),
                      *(_port_id(runner, op, record, i) for i in range(len(record.networks))))
    finally:
        if op.progress != before:
            await runner.save(op)  # what was made is recorded, even when a part failed
    bound: list[port_pb2.Port] = await _gather(*(network.BindPort(port_pb2.BindPortRequest(
        id=op.progress[teardown.port_key(index)], node=op.node, device_id=record.meta.id,
        device_owner=DEVICE_OWNER)) for index in range(len(record.networks))))

    def wired(found: Instance) -> None:
        del found.port_ids[:]
        del found.addresses[:]
        for port in bound:
            found.port_ids.append(port.meta.id)
            for ip in port.fixed_ips:
                found.addresses.add(network_id=port.network_id, port_id=port.meta.id,
                                    ip_address=ip.ip_address, mac_address=port.mac_address,
                                    ip_version=6 if ":" in ip.ip_address else 4, type="fixed")

    op.progress["ports_bound"] = "1"
    return await runner.step(op, TaskState.TASK_STATE_BLOCK_DEVICE_MAPPING, mutate=wired,
                             event="block_device_mapping"), {p.meta.id: p for p in bound}


async def _root_volume(runner: operation.Runner, op: Operation,
                       record: Instance) -> volume_pb2.Volume | None:
    """The root disk made from the image, once made (None: the instance boots from a volume)."""
    if record.boot_volume_id:
        return None
    storage = runner.clients.storage
    if not op.progress.get(teardown.ROOT):  # resumed from before the ports' record
        await _ask_root_disk(runner, op, record)
        await runner.save(op)
    volume_id = op.progress[teardown.ROOT]
    ends = asyncio.get_running_loop().time() + runner.settings.volume_wait_timeout
    pause = 0.03
    while True:
        volume = await storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
        if volume.state in _READY:
            return volume
        if volume.state == volume_pb2.Volume.ERROR:
            raise errors.FailedPrecondition(
                f"root disk {volume_id} failed: {volume.fault.message}",
                reason=volume.fault.reason or "nubis.volume.error")
        if asyncio.get_running_loop().time() > ends:
            raise errors.Unavailable(f"root disk {volume_id} not ready in time",
                                     reason="nubis.volume.timeout", metadata={"node": op.node})
        await asyncio.sleep(pause)
        pause = min(pause * 1.5, 0.25)


def _begun(volume: volume_pb2.Volume, attachment_id: str) -> bool:
    """The root disk is ATTACHING (or IN_USE) through `attachment_id` and it alone: made
    reserved for the instance, which storage began when it was made (its path is the
    connection's)."""
    return (bool(attachment_id) and volume.state in _BEGUN and len(volume.attachments) == 1
            and volume.attachments[0].attachment_id == attachment_id)


async def _attach_root(runner: operation.Runner, op: Operation, record: Instance,
                       volume_id: str) -> tuple[str, attachment_pb2.DiskConnection]:
    """The boot volume (or a root disk made unreserved) reserved and begun as vda: the
    attachment's id and connection."""
    storage = runner.clients.storage
    attachment_id = op.progress.get(teardown.ATTACHMENT, "")
    if not attachment_id:
        reserved = await storage.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
            volume_id=volume_id, instance_id=record.meta.id, node=op.node,
            request_id=f"{op.id}.attach.{op.attempt}"))
        attachment_id = op.progress[teardown.ATTACHMENT] = reserved.meta.id
        await runner.save(op)
        attached = reserved
    else:  # resumed: the reservation may be further along
        attached = await storage.GetVolumeAttachment(
            attachment_pb2.GetVolumeAttachmentRequest(id=attachment_id))
    if attached.state not in _ATTACHMENT_BEGUN:  # else: resumed after it
        attached = await storage.BeginAttach(attachment_pb2.BeginAttachRequest(
            attachment_id=attachment_id, device_name=ROOT_DEVICE))
    return attachment_id, attached.connection


async def _map_disks(runner: operation.Runner, op: Operation,
                     record: Instance) -> tuple[Instance, list[tasks_pb2.DomainDisk]]:
    made = await _root_volume(runner, op, record)
    volume_id = made.meta.id if made is not None else record.boot_volume_id
    attachment_id = op.progress.get(teardown.ATTACHMENT, "")
    if made is not None and _begun(made, attachment_id):  # made reserved, begun by storage
        path, disk_format = made.path, made.format
    else:
        attachment_id, connection = await _attach_root(runner, op, record, volume_id)
        path, disk_format = connection.path, connection.format
    disk = tasks_pb2.DomainDisk(volume_id=volume_id, path=path, format=disk_format or "qcow2",
                                target_dev=ROOT_DEVICE, bus="virtio", boot=True)
    data = await block_devices.attach_all(runner, op, record)

    def mapped(found: Instance) -> None:
        found.root_volume_id = volume_id
        del found.volumes[:]
        found.volumes.add(volume_id=volume_id, attachment_id=attachment_id,
                          device_name=ROOT_DEVICE, boot=True,
                          delete_on_termination=bool(record.image_id))
        block_devices.record_volumes(op, record, found)

    return await runner.step(op, TaskState.TASK_STATE_SPAWNING, mutate=mapped,
                             event="spawn"), [disk, *data]


async def _interfaces(runner: operation.Runner, op: Operation, record: Instance,
                      bound: dict[str, port_pb2.Port]) -> list[tasks_pb2.DomainInterface]:
    """The NICs of the domain: from the bind's answers, or (resumed) the ports as they are."""
    async def port_of(port_id: str) -> port_pb2.Port:
        known = bound.get(port_id)
        if known is not None and known.state == port_pb2.Port.ACTIVE:
            return known
        return await runner.clients.network.GetPort(port_pb2.GetPortRequest(id=port_id))

    found = []
    ports = await _gather(*(port_of(op.progress[teardown.port_key(index)])
                            for index in range(len(record.networks))))
    for port in ports:
        found.append(tasks_pb2.DomainInterface(
            port_id=port.meta.id, mac=port.mac_address, network_id=port.network_id,
            filterref_xml=dict(port.binding_details).get("filterref_xml", "")))
    return found


async def _spawn(runner: operation.Runner, op: Operation, record: Instance,
                 disks: list[tasks_pb2.DomainDisk], bound: dict[str, port_pb2.Port]) -> None:
    spec = tasks_pb2.DomainSpec(
        name=instance.domain_name(record.meta.id), uuid=record.meta.id,
        vcpus=record.flavor.vcpus, memory_mb=record.flavor.ram_mb, disks=disks,
        interfaces=await _interfaces(runner, op, record, bound),
        project_id=record.meta.project_id,
        hostname=record.hostname,
        kernel_boot=await kernel_boot.of_image(runner.clients.storage, record.image_id))
    await runner.send(op, tasks.SPAWN, tasks_pb2.SpawnRequest(domain=spec))
    await runner.clients.storage.CompleteAttach(attachment_pb2.CompleteAttachRequest(
        attachment_id=op.progress[teardown.ATTACHMENT]))
    await block_devices.complete_all(runner, op, record)

    def active(found: Instance) -> None:
        found.state = Instance.ACTIVE
        found.power_state = Instance.POWER_STATE_RUNNING
        found.domain_name = instance.domain_name(found.meta.id)
        found.launched_time.CopyFrom(resources.now())
        found.ClearField("fault")

    await runner.finish(op, active)


async def _attempt(runner: operation.Runner, op: Operation) -> None:
    """Run the build from its recorded step to ACTIVE, or raise _AttemptFailed."""
    record = await runner.instance_of(op)
    step = TaskState.TASK_STATE_SCHEDULING
    bound: dict[str, port_pb2.Port] = {}
    try:
        if not op.node:
            record = await _schedule(runner, op, record)
        step = TaskState.TASK_STATE_NETWORKING
        if op.progress.get("ports_bound") != "1":
            record, bound = await _wire(runner, op, record)
        step = TaskState.TASK_STATE_BLOCK_DEVICE_MAPPING
        record, disks = await _map_disks(runner, op, record)
        step = TaskState.TASK_STATE_SPAWNING
        await _spawn(runner, op, record, disks, bound)
    except (operation.Superseded, operation.Handover, _AttemptFailed):
        raise
    except errors.Unavailable as exc:
        if exc.reason in (operation.NODE_UNAVAILABLE, "nubis.volume.timeout"):
            raise _AttemptFailed(step, exc) from exc
        raise  # etcd or a service out of reach: run again from the recorded step
    except errors.NubisError as exc:
        raise _AttemptFailed(step, exc) from exc


class Build:
    """The BUILD handler."""

    async def run(self, runner: operation.Runner, op: Operation) -> None:
        if op.attempt == 0:
            op.attempt = 1
        while True:
            try:
                await _attempt(runner, op)
                return
            except _AttemptFailed as failed:
                node = op.node
                log.warning("build attempt failed", instance_id=op.instance_id, node=node,
                            attempt=op.attempt, error=failed.cause.message)
                if not failed.reschedule or op.attempt > runner.settings.build_retries:
                    await self.fail(runner, op, failed.fault(node))
                    return
                await self._reschedule(runner, op, node, failed)

    async def _reschedule(self, runner: operation.Runner, op: Operation, node: str,
                          failed: _AttemptFailed) -> None:
        record = (await instance.fetch(runner.store, op.instance_id)).value
        await teardown.release_attempt(runner, op, record)
        await block_devices.release(runner, op, record)
        if node and node not in op.failed_nodes:
            op.failed_nodes.append(node)
        op.attempt += 1
        op.node = ""
        op.progress.pop("ports_bound", None)
        op.unanswered = 0
        message = failed.fault(node).message
        op.progress[LAST_FAULT] = message
        op.progress[LAST_REASON] = failed.cause.reason

        def unplaced(found: Instance) -> None:
            found.node = ""
            found.root_volume_id = ""
            del found.volumes[:]
            found.fault.CopyFrom(operation.fault(BUILD_FAILED, message + "; rescheduled"))

        await runner.step(op, TaskState.TASK_STATE_SCHEDULING, mutate=unplaced,
                          event="reschedule", node="")

    async def fail(self, runner: operation.Runner, op: Operation,
                   fault: operation.Fault) -> None:
        """ERROR with `fault`: domain, disk, ports, claim and quota all given back."""
        record = (await instance.fetch(runner.store, op.instance_id)).value
        await teardown.release_attempt(runner, op, record)
        await block_devices.release(runner, op, record)
        await teardown.release_ports(runner, op, record, keep=False)
        await teardown.release_claim(runner, op)

        def failed(found: Instance) -> None:
            found.state = Instance.ERROR
            found.power_state = Instance.POWER_STATE_NOSTATE
            found.node = ""
            found.root_volume_id = ""
            del found.volumes[:]
            del found.port_ids[:]
            del found.addresses[:]
            found.quota_released = True

        await runner.finish(op, failed, fault=fault, extra=teardown.give_back(record),
                            quota=True)


def register(runner: operation.Runner) -> None:
    """Give `runner` the BUILD handler."""
    runner.register(operation.Kind.BUILD, Build())
