"""The work behind a volume's transient states: the agent tasks and the outcome they record.

Each handler runs one operation from its start (also when a replica adopted
it after its first runner died): it re-reads the volume, sends the
idempotent agent task with the operation's id and records the outcome with
`Runner.finish`. A volume that no longer carries the operation (reset by an
admin, deleted) only has its operation record dropped.
"""

from __future__ import annotations

from google.protobuf import wrappers_pb2
from google.protobuf.message import Message
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2

from services.common import errors, quota, tasks
from services.common.store import Txn
from services.storage import attachment, image, keys, operation, pool
from services.storage.volume import Volume, put

GIB = pool.GIB
_FORMATS = {image_pb2.Image.DISK_FORMAT_QCOW2: "qcow2", image_pb2.Image.DISK_FORMAT_RAW: "raw"}


def is_agent_failure(exc: errors.NubisError) -> bool:
    """True for an error that ends the operation (a node's refusal, a node that never answered).

    An etcd outage (Unavailable without a node) is not: the step runs again.
    """
    return not isinstance(exc, errors.Unavailable) or exc.reason == operation.NODE_UNAVAILABLE


async def _current(runner: operation.Runner, op: operation.Operation) -> Volume | None:
    """The volume if it still carries `op`; else None (and the stale record is dropped)."""
    found = await runner.store.find(keys.volume(op.resource_id), Volume)
    if found is not None and found.value.task_id == op.id:
        return found.value

    async def nothing(txn: Txn) -> None:
        return None

    await runner.finish(op, nothing)
    return None


def _owned(volume: Volume | None, op: operation.Operation) -> bool:
    return volume is not None and volume.task_id == op.id


async def _backing_image(runner: operation.Runner,
                         image_id: str) -> tasks_pb2.CachedImageSource:
    source = (await runner.store.get(keys.image(image_id), image_pb2.Image)).value
    return tasks_pb2.CachedImageSource(
        image_id=image_id, size_bytes=source.size_bytes, sha256=source.checksum_sha256,
        disk_format=_FORMATS.get(source.disk_format, "raw"))


async def _to_error(runner: operation.Runner, op: operation.Operation,
                    fault: resource_pb2.Fault) -> None:
    async def writes(txn: Txn) -> None:
        found = await txn.get(keys.volume(op.resource_id), Volume)
        if found is None or not _owned(found.value, op):
            return
        volume = found.value
        volume.state, volume.task_id = Volume.ERROR, ""
        volume.fault.CopyFrom(fault)
        put(txn, volume)

    await runner.finish(op, writes, reads=_volume_read(op))


def _volume_read(op: operation.Operation) -> list[tuple[str, type[Message]]]:
    """What an outcome's writes read besides the operation record: the volume."""
    return [(keys.volume(op.resource_id), Volume)]


class CreateVolume:
    """CREATING → AVAILABLE: the agent makes the volume (fetching its image first if needed)."""

    async def run(self, runner: operation.Runner, op: operation.Operation) -> None:
        volume = await _current(runner, op)
        if volume is None:
            return
        request = tasks_pb2.EnsureVolumeRequest(
            pool=volume.pool_name, name=volume.libvirt_name,
            capacity_bytes=volume.size_gb * GIB, format="qcow2")
        if volume.source_image_id:
            request.backing_image.CopyFrom(await _backing_image(runner, volume.source_image_id))
        elif volume.source_snapshot_id:
            request.backing_volume = f"snapshot-{volume.source_snapshot_id}"
        try:
            made = await runner.send(op, tasks.ENSURE_VOLUME, request)
        except errors.NubisError as exc:
            if not is_agent_failure(exc):
                raise
            await self.fail(runner, op, operation.fault_of(exc))
            return

        async def writes(txn: Txn) -> None:
            found = await txn.get(keys.volume(op.resource_id), Volume)
            if found is None or not _owned(found.value, op):
                return
            done = found.value
            done.state, done.task_id = Volume.AVAILABLE, ""
            done.path, done.format = made.volume.path, made.volume.format or "qcow2"
            done.pool_name = made.volume.pool or done.pool_name
            if op.attachment_id:  # a root disk reserved as it was made: it begins attaching
                await attachment.begin_made(txn, done, op.attachment_id)
            put(txn, done)

        reads = _volume_read(op)
        if op.attachment_id:
            reads.append((keys.attachment(op.attachment_id), attachment.Attachment))
        await runner.finish(op, writes, quota=False, reads=reads)

    async def fail(self, runner: operation.Runner, op: operation.Operation,
                   fault: resource_pb2.Fault) -> None:
        await _to_error(runner, op, fault)


class DeleteVolume:
    """DELETING → gone: the agent removes the volume, then the record, its keys and its quota."""

    async def run(self, runner: operation.Runner, op: operation.Operation) -> None:
        volume = await _current(runner, op)
        if volume is None:
            return
        try:
            await delete_on_node(runner, op, volume.pool_name, volume.libvirt_name)
        except errors.NubisError as exc:
            if not is_agent_failure(exc):
                raise
            await self.fail(runner, op, operation.fault_of(exc))
            return

        async def writes(txn: Txn) -> None:
            found = await txn.get(keys.volume(op.resource_id), Volume)
            if found is None or not _owned(found.value, op):
                return
            await forget(txn, found.value)

        await runner.finish(op, writes, reads=_volume_read(op))

    async def fail(self, runner: operation.Runner, op: operation.Operation,
                   fault: resource_pb2.Fault) -> None:
        await _to_error(runner, op, fault)


async def delete_on_node(runner: operation.Runner, op: operation.Operation, pool_name: str,
                         name: str) -> None:
    """The agent's delete of one libvirt volume (a missing volume is done: no error)."""
    await runner.send(op, tasks.DELETE_VOLUME,
                      tasks_pb2.DeleteVolumeRequest(pool=pool_name, name=name))


async def forget(txn: Txn, volume: Volume) -> None:
    """Remove a deleted volume's record, index keys and attachments, and release its quota."""
    txn.delete(keys.volume(volume.meta.id))
    for ref in volume.attachments:
        txn.delete(keys.attachment(ref.attachment_id))
    if volume.source_image_id:
        image.drop_user(txn, volume.source_image_id, volume.meta.id)
    if volume.source_snapshot_id:
        txn.delete(keys.snapshot_user(volume.source_snapshot_id, volume.meta.id))
    if volume.root_disk_of_instance_id:
        found = await txn.get(keys.root_disk(volume.root_disk_of_instance_id),
                              wrappers_pb2.StringValue)
        if found is not None and found.value.value == volume.meta.id:  # else: a newer disk's
            txn.delete(keys.root_disk(volume.root_disk_of_instance_id))
    else:
        await quota.release(txn, volume.meta.project_id,
                            {"volumes": 1, "volume_gb": volume.size_gb})


class ExtendVolume:
    """EXTENDING → AVAILABLE at the new size; on failure the old size and the quota come back."""

    async def run(self, runner: operation.Runner, op: operation.Operation) -> None:
        volume = await _current(runner, op)
        if volume is None:
            return
        try:
            await runner.send(op, tasks.RESIZE_VOLUME, tasks_pb2.ResizeVolumeRequest(
                pool=volume.pool_name, name=volume.libvirt_name,
                capacity_bytes=op.new_size_gb * GIB))
        except errors.NubisError as exc:
            if not is_agent_failure(exc):
                raise
            await self.fail(runner, op, operation.fault_of(exc))
            return

        async def writes(txn: Txn) -> None:
            found = await txn.get(keys.volume(op.resource_id), Volume)
            if found is None or not _owned(found.value, op):
                return
            done = found.value
            done.state, done.task_id, done.size_gb = Volume.AVAILABLE, "", op.new_size_gb
            put(txn, done)

        await runner.finish(op, writes)

    async def fail(self, runner: operation.Runner, op: operation.Operation,
                   fault: resource_pb2.Fault) -> None:
        async def writes(txn: Txn) -> None:
            found = await txn.get(keys.volume(op.resource_id), Volume)
            if found is None or not _owned(found.value, op):
                return
            volume = found.value
            volume.state, volume.task_id = Volume.AVAILABLE, ""
            volume.fault.CopyFrom(fault)
            if not volume.root_disk_of_instance_id:
                await quota.release(txn, volume.meta.project_id,
                                    {"volume_gb": op.new_size_gb - volume.size_gb})
            put(txn, volume)

        await runner.finish(op, writes)


def register(runner: operation.Runner) -> None:
    runner.register(operation.Kind.CREATE_VOLUME, CreateVolume())
    runner.register(operation.Kind.DELETE_VOLUME, DeleteVolume())
    runner.register(operation.Kind.EXTEND_VOLUME, ExtendVolume())

