"""Boot-time block devices: existing volumes of the project attached as the server is built.

Only `volume_id` sources are taken (Nova's block device mapping of
`source_type=volume`); volumes made from an image or a snapshot are refused
with INVALID_ARGUMENT. Admission checks each volume exists in the project
(NOT_FOUND naming `instance.block_devices[i].volume_id`) and is AVAILABLE
(FAILED_PRECONDITION naming it); storage is local to a node, so every volume
(and the boot volume) must live on one node (else INVALID_ARGUMENT), and the
scheduler is pinned to it. The build's block-device step reserves and begins
the attachment of each (its id kept in the operation's progress under
`bdm.<i>`, request ids from the operation, so a resumed build makes no second
one), the domain is defined with the disks, and the attachments complete once
it runs; the volumes are recorded on the instance as hot-plugged ones are, so
detach and delete handle them. A failed attempt ends the attachments (the
volumes are AVAILABLE again).
"""

from __future__ import annotations

import asyncio
import contextlib

from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2
from nubis.storage.v1 import attachment_pb2, volume_pb2

from services.client import peers
from services.common import errors
from services.compute import operation

Instance = instance_pb2.Instance
Attachment = attachment_pb2.VolumeAttachment
_LETTERS = "bcdefghijklmnopqrstuvwxyz"
NOT_AVAILABLE = "nubis.volume.not_available"


def _field(index: int, name: str = "volume_id") -> str:
    return f"instance.block_devices[{index}].{name}"


def progress_key(index: int) -> str:
    """The operation's progress key of block device `index`'s attachment."""
    return f"bdm.{index}"


def device_names(record: Instance) -> list[str]:
    """The guest device of each block device: the one asked for, else the next free."""
    taken = {d.device_name for d in record.block_devices if d.device_name}
    free = (f"vd{letter}" for letter in _LETTERS if f"vd{letter}" not in taken)
    return [d.device_name or next(free) for d in record.block_devices]


async def _usable(clients: peers.ServiceClients, project_id: str, index: int,
                  volume_id: str) -> str:
    field = _field(index)
    try:
        volume = await clients.storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
    except errors.NotFound:
        volume = None
    if volume is None or volume.meta.project_id != project_id:
        raise errors.NotFound(f"{field}: volume {volume_id} not found",
                              metadata={"field": field, "id": volume_id})
    if volume.state != volume_pb2.Volume.AVAILABLE:
        state = volume_pb2.Volume.State.Name(volume.state)
        raise errors.FailedPrecondition(f"{field}: volume {volume_id} is {state}, not AVAILABLE",
                                        reason=NOT_AVAILABLE,
                                        metadata={"field": field, "id": volume_id})
    return str(volume.node)


async def check(clients: peers.ServiceClients, project_id: str, sent: Instance) -> None:
    """Every block device's volume usable by the project, all on one node."""
    nodes = await asyncio.gather(*(_usable(clients, project_id, i, d.volume_id)
                                   for i, d in enumerate(sent.block_devices)))
    if sent.boot_volume_id:
        boot = await clients.storage.GetVolume(
            volume_pb2.GetVolumeRequest(id=sent.boot_volume_id))
        nodes.append(boot.node)
    if len(set(nodes) - {""}) > 1:
        field = "instance.block_devices"
        why = "the volumes live on different nodes (local storage); one server needs one node"
        raise errors.InvalidArgument(f"{field}: {why}",
                                     violations=[errors.FieldViolation(field, why)])


async def pins(runner: operation.Runner, record: Instance) -> set[str]:
    """The nodes the block devices' volumes live on."""
    found = set()
    for device in record.block_devices:
        volume = await runner.clients.storage.GetVolume(
            volume_pb2.GetVolumeRequest(id=device.volume_id))
        found.add(volume.node)
    return found - {""}


async def _attach_one(runner: operation.Runner, op: operation.Operation, record: Instance,
                      index: int, device: str) -> tasks_pb2.DomainDisk:
    storage = runner.clients.storage
    volume_id = record.block_devices[index].volume_id
    attachment_id = op.progress.get(progress_key(index), "")
    if not attachment_id:
        reserved = await storage.ReserveVolume(attachment_pb2.ReserveVolumeRequest(
            volume_id=volume_id, instance_id=record.meta.id, node=op.node,
            request_id=f"{op.id}.bdm.{index}.{op.attempt}"))
        attachment_id = op.progress[progress_key(index)] = reserved.meta.id
        await runner.save(op)
        attached = reserved
    else:  # resumed: the reservation may be further along
        attached = await storage.GetVolumeAttachment(
            attachment_pb2.GetVolumeAttachmentRequest(id=attachment_id))
    if attached.state != Attachment.ATTACHED:
        attached = await storage.BeginAttach(attachment_pb2.BeginAttachRequest(
            attachment_id=attachment_id, device_name=device))
    return tasks_pb2.DomainDisk(volume_id=volume_id, path=attached.connection.path,
                                format=attached.connection.format or "qcow2",
                                target_dev=device, bus="virtio")


async def attach_all(runner: operation.Runner, op: operation.Operation,
                     record: Instance) -> list[tasks_pb2.DomainDisk]:
    """Reserve and begin the attachment of every block device (once per attempt)."""
    names = device_names(record)
    return [await _attach_one(runner, op, record, index, names[index])
            for index in range(len(record.block_devices))]


def record_volumes(op: operation.Operation, record: Instance, found: Instance) -> None:
    """Add the block devices to `found.volumes`, as hot-plugged volumes are recorded."""
    for index, name in enumerate(device_names(record)):
        found.volumes.add(volume_id=record.block_devices[index].volume_id,
                          attachment_id=op.progress[progress_key(index)], device_name=name)


async def complete_all(runner: operation.Runner, op: operation.Operation,
                       record: Instance) -> None:
    """Mark every block device's attachment ATTACHED (the domain runs with them)."""
    for index in range(len(record.block_devices)):
        await runner.clients.storage.CompleteAttach(attachment_pb2.CompleteAttachRequest(
            attachment_id=op.progress[progress_key(index)]))


async def release(runner: operation.Runner, op: operation.Operation, record: Instance,
                  *, unrecorded: bool = False) -> None:
    """End the attempt's block-device attachments: the volumes are AVAILABLE again
    (`unrecorded`: only those not yet in `record.volumes`, which a delete ends itself)."""
    recorded = {v.attachment_id for v in record.volumes} if unrecorded else set()
    for index in range(len(record.block_devices)):
        attachment_id = op.progress.pop(progress_key(index), "")
        if attachment_id and attachment_id not in recorded:
            with contextlib.suppress(errors.NotFound):
                await runner.clients.storage.CompleteDetach(
                    attachment_pb2.CompleteDetachRequest(attachment_id=attachment_id))
