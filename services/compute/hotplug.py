"""Hot-plug: attach and detach volumes and ports of an ACTIVE or STOPPED instance.

AttachVolume reserves the volume for the instance at storage before the
operation starts, so storage's own refusals reach the caller at once (a
volume in another node's pool: FAILED_PRECONDITION `nubis.volume.other_node`;
one not available: `nubis.volume.not_available`). The operation then begins
the attachment (storage answers where the disk is on the node), has the
agent plug the disk into the domain (`attach_device`), and completes the
attachment. DetachVolume unplugs the disk first (`detach_device`), then ends
the attachment; the root volume is never detached. A failed plug rolls the
reservation back; a failed unplug leaves the attachment as it was (an
admin's `force` drops it anyway).

AttachPort plugs an existing port of the project (not in use by another
device) or a new one made on a network (request id from the operation, so a
repeat makes no second port): bound on the instance's node, plugged as a NIC.
It joins `networks` and `port_ids` at the same index, as boot NICs do, so the
teardown knows which ports compute made. DetachPort unplugs the NIC, then
deletes a port compute made or unbinds the caller's own.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2, instance_verbs_pb2
from nubis.network.v1 import network_pb2, port_pb2
from nubis.storage.v1 import attachment_pb2, volume_pb2

from services.common import errors, policy, resources, tasks
from services.common.context import Principal
from services.compute import instance as instance_module
from services.compute import lifecycle, move, teardown
from services.compute.operation import Fault, Kind, Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
State = instance_pb2.Instance.State
TaskState = instance_pb2.Instance.TaskState
Attachment = attachment_pb2.VolumeAttachment

ROOT_VOLUME = "nubis.instance.root_volume"
ATTACHED = "nubis.instance.already_attached"
PORT_IN_USE = "nubis.port.in_use"
ATTACHMENT = "attachment_id"
"""Progress key: the storage attachment of the volume being plugged."""
_DEVICE = re.compile(r"^vd[b-z]$")
_PLUGGABLE: tuple[State.ValueType, ...] = (Instance.ACTIVE, Instance.STOPPED)


def _keep_state(task_state: TaskState.ValueType) -> Callable[[Instance], None]:
    def mutate(found: Instance) -> None:
        found.task_state = task_state
    return mutate


def _ids(**fields: str) -> None:
    found = errors.ViolationCollector()
    for name, value in fields.items():
        if not resources.is_uuid(value):
            found.add(name, "must be a UUID")
    found.check("invalid request")


def next_device(found: Instance, wanted: str) -> str:
    """The guest device of a new disk: `wanted` if free, else the first free vdb..vdz."""
    used = {item.device_name for item in found.volumes} | {move.ROOT_DEVICE}
    if wanted:
        if not _DEVICE.fullmatch(wanted):
            raise errors.InvalidArgument(f"device name {wanted!r} is not vdb..vdz", violations=[
                errors.FieldViolation("device_name", "vdb..vdz, or empty for the next free")])
        if wanted in used:
            raise errors.InvalidArgument(f"device {wanted} is in use", violations=[
                errors.FieldViolation("device_name", "already used by another disk")])
        return wanted
    for letter in "bcdefghijklmnopqrstuvwxyz":
        if f"vd{letter}" not in used:
            return f"vd{letter}"
    raise errors.FailedPrecondition(f"instance {found.meta.id} has no free disk device",
                                    reason="nubis.instance.no_device")


# --- volumes ------------------------------------------------------------------------

async def _volume(runner: Runner, found: Instance, volume_id: str) -> volume_pb2.Volume:
    """The volume, if it belongs to the instance's project (else NOT_FOUND, as storage hides it)."""
    volume = await runner.clients.storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
    if volume.meta.project_id != found.meta.project_id:
        raise errors.NotFound(f"volume {volume_id} not found",
                              metadata={"volume_id": volume_id, "field": "volume_id"})
    return volume


async def attach_volume(runner: Runner, principal: Principal,
                        request: instance_verbs_pb2.AttachVolumeRequest) -> Instance:
    """Reserve the volume, then plug it into the instance in the background."""
    _ids(instance_id=request.instance_id, volume_id=request.volume_id)
    current = (await instance_module.visible(runner.store, principal, request.instance_id)).value
    allowed = lifecycle.needs("attach volume", _PLUGGABLE)
    allowed(current)
    if any(item.volume_id == request.volume_id for item in current.volumes):
        raise errors.FailedPrecondition(
            f"volume {request.volume_id} is already attached to instance {current.meta.id}",
            reason=ATTACHED, metadata={"volume_id": request.volume_id})
    device = next_device(current, request.device_name)
    await _volume(runner, current, request.volume_id)
    reserved = await runner.clients.storage.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
        volume_id=request.volume_id, instance_id=current.meta.id, node=current.node))
    params = Operation(volume_id=request.volume_id, device_name=device)
    params.progress[ATTACHMENT] = reserved.meta.id
    try:
        started = await runner.begin(
            principal, current.meta.id, Kind.ATTACH_VOLUME, action="attach_volume",
            allowed=allowed, mutate=_keep_state(TaskState.TASK_STATE_ATTACHING_VOLUME),
            params=params)
    except errors.NubisError:
        if reserved.state == Attachment.RESERVED:  # ours, never begun: give it back
            await runner.clients.storage.CompleteDetach(
                attachment_pb2.CompleteDetachRequest(attachment_id=reserved.meta.id))
        raise
    return instance_module.shown(started, principal)


def _disk(volume_id: str, device: str, connection: attachment_pb2.DiskConnection,
          ) -> tasks_pb2.DomainDisk:
    return tasks_pb2.DomainDisk(volume_id=volume_id, path=connection.path,
                                format=connection.format or "qcow2", target_dev=device,
                                bus="virtio")


def _failed(verb: str, exc: errors.NubisError) -> Fault:
    return move.fault_of(verb, exc)


class AttachVolumeHandler:
    """ATTACH_VOLUME: begin the attachment, plug the disk, complete the attachment."""

    async def run(self, runner: Runner, op: Operation) -> None:
        storage = runner.clients.storage
        attachment_id = op.progress[ATTACHMENT]
        try:
            found = await storage.GetVolumeAttachment(
                attachment_pb2.GetVolumeAttachmentRequest(id=attachment_id))
            if found.state == Attachment.RESERVED:
                found = await storage.BeginAttach(attachment_pb2.BeginAttachRequest(
                    attachment_id=attachment_id, device_name=op.device_name))
            await runner.send(op, tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(
                name=instance_module.domain_name(op.instance_id),
                disk=_disk(op.volume_id, op.device_name, found.connection)))
            if found.state == Attachment.ATTACHING:
                await storage.CompleteAttach(
                    attachment_pb2.CompleteAttachRequest(attachment_id=attachment_id))
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, _failed("attach volume", exc))
            return

        def attached(record: Instance) -> None:
            if not any(item.volume_id == op.volume_id for item in record.volumes):
                record.volumes.add(volume_id=op.volume_id, attachment_id=attachment_id,
                                   device_name=op.device_name)

        await runner.finish(op, attached)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The reservation goes back (the disk unplugged if the node plugged it)."""
        name = instance_module.domain_name(op.instance_id)
        try:
            await runner.send(op, tasks.DETACH_DEVICE, tasks_pb2.DeviceRequest(
                name=name, disk=tasks_pb2.DomainDisk(volume_id=op.volume_id,
                                                     target_dev=op.device_name)))
        except errors.NubisError as exc:
            log.warning("could not unplug a disk whose attach failed", operation_id=op.id,
                        error=exc.message)
        with contextlib.suppress(errors.NotFound):
            await runner.clients.storage.CompleteDetach(
                attachment_pb2.CompleteDetachRequest(attachment_id=op.progress[ATTACHMENT]))
        await runner.finish(op, lambda record: None, fault=fault)


async def detach_volume(runner: Runner, principal: Principal,
                        request: instance_verbs_pb2.DetachVolumeRequest) -> Instance:
    """Unplug a data volume from the instance in the background (the root volume stays)."""
    _ids(instance_id=request.instance_id, volume_id=request.volume_id)
    if request.force and not policy.is_cloud_admin(principal):
        raise errors.PermissionDenied("force needs the cloud-admin role",
                                      reason="nubis.policy.denied",
                                      metadata={"required_role": "cloud-admin"})

    def allowed(found: Instance) -> None:
        lifecycle.needs("detach volume", _PLUGGABLE)(found)
        attached = [item for item in found.volumes if item.volume_id == request.volume_id]
        if not attached:
            raise errors.NotFound(
                f"volume {request.volume_id} is not attached to instance {found.meta.id}",
                metadata={"volume_id": request.volume_id, "field": "volume_id"})
        if attached[0].boot or request.volume_id == found.root_volume_id:
            raise errors.FailedPrecondition(
                f"volume {request.volume_id} is the root disk of instance {found.meta.id}: "
                "it cannot be detached", reason=ROOT_VOLUME,
                metadata={"volume_id": request.volume_id})
        params.device_name = attached[0].device_name
        params.progress[ATTACHMENT] = attached[0].attachment_id

    params = Operation(volume_id=request.volume_id, force=request.force)
    started = await runner.begin(
        principal, request.instance_id, Kind.DETACH_VOLUME, action="detach_volume",
        allowed=allowed, mutate=_keep_state(TaskState.TASK_STATE_DETACHING_VOLUME),
        params=params)
    return instance_module.shown(started, principal)


class DetachVolumeHandler:
    """DETACH_VOLUME: unplug the disk, then end the attachment."""

    async def run(self, runner: Runner, op: Operation) -> None:
        storage = runner.clients.storage
        attachment_id = op.progress[ATTACHMENT]
        try:
            try:
                await runner.send(op, tasks.DETACH_DEVICE, tasks_pb2.DeviceRequest(
                    name=instance_module.domain_name(op.instance_id),
                    disk=tasks_pb2.DomainDisk(volume_id=op.volume_id,
                                              target_dev=op.device_name)))
            except errors.NubisError as exc:
                if move.transient(exc) or not op.force:
                    raise
                log.warning("node did not unplug the disk; dropped by force", error=exc.message,
                            operation_id=op.id)
            try:
                found = await storage.GetVolumeAttachment(
                    attachment_pb2.GetVolumeAttachmentRequest(id=attachment_id))
                if found.state == Attachment.ATTACHED:
                    await storage.BeginDetach(
                        attachment_pb2.BeginDetachRequest(attachment_id=attachment_id))
                await storage.CompleteDetach(
                    attachment_pb2.CompleteDetachRequest(attachment_id=attachment_id))
            except errors.NotFound:
                pass  # already gone (a repeat)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, _failed("detach volume", exc))
            return

        def detached(record: Instance) -> None:
            kept = [item for item in record.volumes if item.volume_id != op.volume_id]
            del record.volumes[:]
            record.volumes.extend(kept)

        await runner.finish(op, detached)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The volume stays attached; the fault says why the node did not unplug it."""
        await runner.finish(op, lambda record: None, fault=fault)


# --- ports --------------------------------------------------------------------------

async def attach_port(runner: Runner, principal: Principal,
                      request: instance_verbs_pb2.AttachPortRequest) -> Instance:
    """Plug an existing port, or a new one on a network, into the instance (background)."""
    nic = request.network
    target = nic.WhichOneof("target")
    found = errors.ViolationCollector()
    if not resources.is_uuid(request.instance_id):
        found.add("instance_id", "must be a UUID")
    if target is None:
        found.add("network", "set network.network_id or network.port_id")
    elif not resources.is_uuid(getattr(nic, target)):
        found.add(f"network.{target}", "must be a UUID")
    found.check("invalid port attach request")
    current = (await instance_module.visible(runner.store, principal, request.instance_id)).value
    allowed = lifecycle.needs("attach port", _PLUGGABLE)
    allowed(current)
    if target == "port_id":
        await _usable_port(runner, current, nic.port_id)
    else:
        await _usable_network(runner, current, nic.network_id)
    params = Operation(network=nic, port_id=nic.port_id)
    started = await runner.begin(
        principal, current.meta.id, Kind.ATTACH_PORT, action="attach_interface",
        allowed=allowed, mutate=_keep_state(TaskState.TASK_STATE_ATTACHING_PORT),
        params=params)
    return instance_module.shown(started, principal)


async def _usable_port(runner: Runner, found: Instance, port_id: str) -> None:
    try:
        port = await runner.clients.network.GetPort(port_pb2.GetPortRequest(id=port_id))
    except errors.NotFound:
        port = None
    if port is None or port.meta.project_id != found.meta.project_id:
        raise errors.NotFound(f"port {port_id} not found",
                              metadata={"port_id": port_id, "field": "network.port_id"})
    if port_id in found.port_ids:
        raise errors.FailedPrecondition(f"port {port_id} is already plugged into instance "
                                        f"{found.meta.id}", reason=ATTACHED,
                                        metadata={"port_id": port_id})
    if port.device_id and port.device_id != found.meta.id:
        raise errors.FailedPrecondition(
            f"port {port_id} is in use by device {port.device_id}", reason=PORT_IN_USE,
            metadata={"port_id": port_id, "device_id": port.device_id})


async def _usable_network(runner: Runner, found: Instance, network_id: str) -> None:
    try:
        network = await runner.clients.network.GetNetwork(
            network_pb2.GetNetworkRequest(id=network_id))
    except errors.NotFound:
        network = None
    if network is None or not (network.meta.project_id == found.meta.project_id
                               or network.shared):
        raise errors.NotFound(f"network {network_id} not found",
                              metadata={"network_id": network_id, "field": "network.network_id"})


class AttachPortHandler:
    """ATTACH_PORT: the port (made if asked for a network), bound on the node, plugged."""

    async def run(self, runner: Runner, op: Operation) -> None:
        network = runner.clients.network
        try:
            record = (await instance_module.fetch(runner.store, op.instance_id)).value
            if not op.port_id:
                made = await network.CreatePort(_port_request(op, record))
                op.port_id = made.meta.id
                await runner.save(op)
            port = await network.BindPort(port_pb2.BindPortRequest(
                id=op.port_id, node=op.node, device_id=op.instance_id,
                device_owner=move.DEVICE_OWNER))
            await runner.send(op, tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(
                name=instance_module.domain_name(op.instance_id),
                interface=_interface(port)))
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, _failed("attach port", exc))
            return

        def plugged(found: Instance) -> None:
            if port.meta.id in found.port_ids:
                return
            found.networks.append(op.network)
            found.port_ids.append(port.meta.id)
            for ip in port.fixed_ips:
                found.addresses.add(network_id=port.network_id, port_id=port.meta.id,
                                    ip_address=ip.ip_address, mac_address=port.mac_address,
                                    ip_version=6 if ":" in ip.ip_address else 4, type="fixed")

        await runner.finish(op, plugged)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """A port made for this attach is deleted; the caller's own is unbound."""
        if op.port_id:
            await _release_port(runner, op.port_id, created=op.network.port_id != op.port_id)
        await runner.finish(op, lambda record: None, fault=fault)


def _port_request(op: Operation, record: Instance) -> port_pb2.CreatePortRequest:
    port = port_pb2.Port(network_id=op.network.network_id, device_owner=move.DEVICE_OWNER,
                         device_id=record.meta.id,
                         security_group_ids=[g for g in record.security_groups
                                             if resources.is_uuid(g)])
    port.meta.project_id = record.meta.project_id
    port.meta.name = f"{record.meta.name}-{len(record.networks)}"[:63]
    if op.network.fixed_ip:
        port.fixed_ips.add(ip_address=op.network.fixed_ip)
    return port_pb2.CreatePortRequest(port=port, request_id=f"{op.id}.port")


def _interface(port: port_pb2.Port) -> tasks_pb2.DomainInterface:
    return tasks_pb2.DomainInterface(
        port_id=port.meta.id, mac=port.mac_address, network_id=port.network_id,
        filterref_xml=dict(port.binding_details).get("filterref_xml", ""))


async def _release_port(runner: Runner, port_id: str, *, created: bool) -> None:
    network = runner.clients.network
    try:
        if created:
            await network.DeletePort(port_pb2.DeletePortRequest(id=port_id, force=True))
        else:
            await network.UnbindPort(port_pb2.UnbindPortRequest(id=port_id))
    except errors.NotFound:
        pass


async def detach_port(runner: Runner, principal: Principal,
                      request: instance_verbs_pb2.DetachPortRequest) -> Instance:
    """Unplug a NIC in the background; compute's own port is deleted, the caller's unbound."""
    _ids(instance_id=request.instance_id, port_id=request.port_id)

    def allowed(found: Instance) -> None:
        lifecycle.needs("detach port", _PLUGGABLE)(found)
        if request.port_id not in found.port_ids:
            raise errors.NotFound(
                f"port {request.port_id} is not plugged into instance {found.meta.id}",
                metadata={"port_id": request.port_id, "field": "port_id"})
        index = list(found.port_ids).index(request.port_id)
        params.progress["created"] = "1" if teardown.created_port(found, index) else "0"

    params = Operation(port_id=request.port_id)
    started = await runner.begin(
        principal, request.instance_id, Kind.DETACH_PORT, action="detach_interface",
        allowed=allowed, mutate=_keep_state(TaskState.TASK_STATE_DETACHING_PORT),
        params=params)
    return instance_module.shown(started, principal)


class DetachPortHandler:
    """DETACH_PORT: unplug the NIC, then delete or unbind the port."""

    async def run(self, runner: Runner, op: Operation) -> None:
        try:
            port = await runner.clients.network.GetPort(port_pb2.GetPortRequest(id=op.port_id))
            await runner.send(op, tasks.DETACH_DEVICE, tasks_pb2.DeviceRequest(
                name=instance_module.domain_name(op.instance_id), interface=_interface(port)))
            await _release_port(runner, op.port_id, created=op.progress.get("created") == "1")
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            if not isinstance(exc, errors.NotFound):
                await self.fail(runner, op, _failed("detach port", exc))
                return

        def unplugged(found: Instance) -> None:
            if op.port_id not in found.port_ids:
                return
            index = list(found.port_ids).index(op.port_id)
            del found.port_ids[index]
            if index < len(found.networks):
                del found.networks[index]
            kept = [item for item in found.addresses if item.port_id != op.port_id]
            del found.addresses[:]
            found.addresses.extend(kept)

        await runner.finish(op, unplugged)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The NIC stays plugged; the fault says why."""
        await runner.finish(op, lambda record: None, fault=fault)


def register(runner: Runner) -> None:
    """The handlers of the hot-plug verbs."""
    runner.register(Kind.ATTACH_VOLUME, AttachVolumeHandler())
    runner.register(Kind.DETACH_VOLUME, DetachVolumeHandler())
    runner.register(Kind.ATTACH_PORT, AttachPortHandler())
    runner.register(Kind.DETACH_PORT, DetachPortHandler())
