"""Rebuild of an instance from an image on its own node (Nova's rebuild).

RebuildInstance takes an ACTIVE, STOPPED or ERROR instance (a task in
flight: FAILED_PRECONDITION `nubis.instance.busy`) booted from an image and
remakes it where it is: the domain is destroyed, a fresh root disk is made
from the image asked for (default the instance's own) in the node's pool,
and the domain is spawned again with the same ports (their addresses stay)
and the same data volumes attached. The node's claim does not change (the
flavor is the same). The instance ends ACTIVE, or STOPPED if it was (as
Nova leaves a stopped server powered off); its old root disk is deleted once
the new one runs. An instance booted from a volume is refused: there is no
image to remake its root from.

The new disk is keyed in storage by the operation id and recorded in the
operation's progress (`move.MOVE_ROOT`) before it is used, so a rebuild
adopted by another replica goes on with the same disk, and a delete that
takes it over removes that disk too. A rebuild that fails deletes the new
disk, keeps the old one as the instance's root and leaves it ERROR.
"""

from __future__ import annotations

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2, instance_verbs_pb2
from nubis.network.v1 import port_pb2
from nubis.storage.v1 import attachment_pb2, image_pb2

from services.common import errors, resources
from services.common.context import Principal
from services.compute import instance as instance_module
from services.compute import lifecycle, move, operation
from services.compute.operation import Fault, Kind, Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
TaskState = Instance.TaskState
VOLUME_BACKED = "nubis.instance.volume_backed"
IMAGE_UNUSABLE = "nubis.instance.image_unusable"
NAME = "name"
"""Progress key: the new name asked for ("" = keep it)."""
STOPPED = "was_stopped"
"""Progress key: "1" if the instance was STOPPED (it is powered off again)."""
_REBUILDABLE = (Instance.ACTIVE, Instance.STOPPED, Instance.ERROR)
_NAME_MAX = 255


def _check(request: instance_verbs_pb2.RebuildInstanceRequest) -> None:
    found = errors.ViolationCollector()
    if not resources.is_uuid(request.id):
        found.add("id", "must be a UUID")
    if request.image_id and not resources.is_uuid(request.image_id):
        found.add("image_id", "must be a UUID")
    if len(request.name) > _NAME_MAX or request.name != request.name.strip():
        found.add("name", f"at most {_NAME_MAX} characters, no surrounding blanks")
    found.check("invalid request")


def _from_image(found: Instance) -> None:
    if found.boot_volume_id or not found.image_id:
        raise errors.FailedPrecondition(
            f"instance {found.meta.id} boots from volume {found.boot_volume_id or '(none)'}: "
            "rebuild remakes a root disk from an image, and it has none",
            reason=VOLUME_BACKED, metadata={"id": found.meta.id,
                                            "volume_id": found.boot_volume_id})


def _visible(image: image_pb2.Image, project_id: str) -> bool:
    """The project may boot the image: public, its own, or shared with it."""
    Image = image_pb2.Image
    return image.visibility == Image.VISIBILITY_PUBLIC or image.meta.project_id == project_id \
        or (image.visibility == Image.VISIBILITY_SHARED and project_id in image.member_project_ids)


async def _usable_image(runner: Runner, project_id: str, image_id: str) -> None:
    missing = errors.NotFound(f"image {image_id} not found",
                              metadata={"image_id": image_id, "field": "image_id"})
    try:
        image = await runner.clients.storage.GetImage(image_pb2.GetImageRequest(id=image_id))
    except errors.NotFound:
        raise missing from None
    if not _visible(image, project_id):
        raise missing
    if image.state != image_pb2.Image.ACTIVE:
        raise errors.FailedPrecondition(
            f"image {image_id} is {image_pb2.Image.State.Name(image.state)}, not ACTIVE",
            reason=IMAGE_UNUSABLE, metadata={"image_id": image_id, "field": "image_id"})


async def rebuild(runner: Runner, principal: Principal,
                  request: instance_verbs_pb2.RebuildInstanceRequest) -> Instance:
    """Rebuild the instance from an image on its node (asynchronous)."""
    _check(request)
    current = (await instance_module.visible(runner.store, principal, request.id)).value
    needs = lifecycle.needs("rebuild", _REBUILDABLE)
    if current.task_id:
        raise operation.busy(current)
    needs(current)
    _from_image(current)
    image_id = request.image_id or current.image_id
    await _usable_image(runner, current.meta.project_id, image_id)

    def allowed(found: Instance) -> None:
        needs(found)
        _from_image(found)

    def mutate(found: Instance) -> None:
        found.task_state = TaskState.TASK_STATE_REBUILDING

    params = Operation(image_id=image_id, node=current.node)
    params.progress[NAME] = request.name
    params.progress[STOPPED] = "1" if current.state == Instance.STOPPED else ""
    return instance_module.shown(await move.start(
        runner, principal, request.id, Kind.REBUILD, action="rebuild", allowed=allowed,
        mutate=mutate, params=params), principal)


async def _new_disk(runner: Runner, op: Operation, found: Instance) -> str:
    """The rebuild's root disk from `op.image_id` (recorded before it is used); its id."""
    if op.progress.get(move.MOVE_ROOT):
        return op.progress[move.MOVE_ROOT]
    source = Instance()
    source.CopyFrom(found)
    source.image_id = op.image_id
    disk = await move.make_disk(runner, op, source, op.node, found.flavor)
    op.progress[move.MOVE_ROOT] = disk.meta.id
    await runner.step(op, op.step, event="compute_rebuild_block_device_mapping")
    return str(disk.meta.id)


async def _spec(runner: Runner, op: Operation, found: Instance, disk_id: str,
                connection: attachment_pb2.DiskConnection) -> tasks_pb2.DomainSpec:
    """The domain as rebuilt: the new root, the instance's ports and its data volumes."""
    ports = [await runner.clients.network.GetPort(port_pb2.GetPortRequest(id=port_id))
             for port_id in found.port_ids]
    rebuilt = Instance()
    rebuilt.CopyFrom(found)
    rebuilt.image_id = op.image_id
    spec = await move.domain_spec(runner.clients.storage, rebuilt, found.flavor,
                                  connection, disk_id, ports)
    for item in found.volumes:
        if item.boot or item.volume_id == found.root_volume_id:
            continue
        data = await move.connection_of(runner, item.attachment_id)
        spec.disks.add(volume_id=item.volume_id, path=data.path, format=data.format or "qcow2",
                       target_dev=item.device_name, bus="virtio")
    return spec


class RebuildHandler:
    """REBUILD: destroy the domain, new root disk from the image, spawn, old root deleted."""

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        old_root = found.root_volume_id
        try:
            await move.destroy(runner, op, op.node)
            disk_id = await _new_disk(runner, op, found)
            await move.wait_available(runner, disk_id)
            attachment = await move.attach_root(runner, found.meta.id, disk_id, op.node)
            spec = await _spec(runner, op, found, disk_id, attachment.connection)
            await runner.step(op, op.step, event="compute_rebuild_spawn")
            status = await move.spawn(runner, op, spec, op.node,
                                      stopped=op.progress.get(STOPPED) == "1")
            if old_root and old_root != disk_id:
                await move.drop_disk(runner, old_root)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, move.fault_of("rebuild", exc))
            return
        root = instance_pb2.AttachedVolume(volume_id=disk_id, attachment_id=attachment.meta.id,
                                           device_name=move.ROOT_DEVICE, boot=True,
                                           delete_on_termination=True)
        stopped = op.progress.get(STOPPED) == "1"

        def rebuilt(record: Instance) -> None:
            record.state = Instance.STOPPED if stopped else Instance.ACTIVE
            record.power_state = lifecycle.power_state(status.state)
            record.image_id = op.image_id
            if op.progress.get(NAME):
                record.meta.name = op.progress[NAME]
            move.set_root(record, root)
            record.launched_time.CopyFrom(resources.now())
            record.ClearField("fault")

        await runner.finish(op, rebuilt)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The new disk goes; the old root stays the instance's root; the instance is ERROR."""
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        made = op.progress.get(move.MOVE_ROOT, "")
        if made and made != found.root_volume_id:
            await move.drop_disk(runner, made)

        def broken(record: Instance) -> None:
            record.state = Instance.ERROR

        await runner.finish(op, broken, fault=fault)


def register(runner: Runner) -> None:
    runner.register(Kind.REBUILD, RebuildHandler())
