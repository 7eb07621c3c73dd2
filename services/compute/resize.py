"""Resize and cold migration (to VERIFY_RESIZE), then ConfirmResize or RevertResize.

ResizeInstance takes an ACTIVE or STOPPED instance to another flavor the
project may use; in the transaction that starts it the instance takes the
new flavor's sizes (the old ones kept in `migration.old_flavor`) and the
quota the new flavor needs beyond the old one (vcpus, ram_mb). The move then
runs in steps, each recorded, each repeatable after an adoption:

- RESIZE_PREP: the scheduler's MoveAllocations claims the new sizes on a
  destination, keeping the source's claim. The destination is always another
  node (Nova's default, allow_resize_to_same_host = False): the scheduler's
  move never picks the source, and a root disk cannot be remade under a
  domain that still boots from it.
- RESIZE_MIGRATING: a new root disk from the image in the destination's pool
  (see services.compute.move: storage copies no disk between nodes), the
  source's domain shut down, the disk attached, the ports bound there.
- RESIZE_FINISH: the domain spawned on the destination with the new sizes
  (powered off again if the instance was STOPPED) → VERIFY_RESIZE.

ConfirmResize destroys the source's domain and disk and releases the source's
allocation; the quota the old flavor held beyond the new one comes back.
RevertResize destroys the destination's domain and disk, binds the ports to
the source again, starts the source's domain (spawned again from its disk if
the node lost it), releases the destination's allocation and restores the
old flavor and its quota. A move that fails before VERIFY_RESIZE is undone
the same way and the instance returns to its state with the fault recorded.
Cold migration (MigrateInstance, services.compute.migration) is this move
with the same flavor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import structlog
from nubis.compute.v1 import instance_pb2, instance_verbs_pb2

from services.common import errors, resources
from services.common.context import Principal
from services.common.store import Txn
from services.compute import flavor as flavor_module
from services.compute import instance as instance_module
from services.compute import lifecycle, move
from services.compute.operation import Fault, Kind, Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
TaskState = instance_pb2.Instance.TaskState
MigrationInfo = instance_pb2.MigrationInfo
Check = Callable[[Instance], None]
SAME_FLAVOR = "nubis.instance.same_flavor"
ATTACHMENT = "root_attachment"
"""Progress key: the destination's root disk attachment."""
State = instance_pb2.Instance.State
_RESIZABLE: tuple[State.ValueType, ...] = (Instance.ACTIVE, Instance.STOPPED)


def _check_request(request: instance_verbs_pb2.ResizeInstanceRequest) -> None:
    found = errors.ViolationCollector()
    if not resources.is_uuid(request.id):
        found.add("id", "must be a UUID")
    if not resources.is_uuid(request.flavor_id):
        found.add("flavor_id", "must be a UUID")
    found.check("invalid resize request")


def _check_flavor(current: Instance, new: instance_pb2.FlavorSizes) -> None:
    if new.flavor_id == current.flavor_id:
        raise errors.InvalidArgument(
            f"instance {current.meta.id} already has flavor {new.name}", reason=SAME_FLAVOR,
            violations=[errors.FieldViolation("flavor_id", "must differ from the current flavor")])
    if new.disk_gb < current.flavor.disk_gb:
        raise errors.InvalidArgument(
            f"flavor {new.name} has a {new.disk_gb} GiB root disk, smaller than the instance's "
            f"{current.flavor.disk_gb} GiB: root disks never shrink", violations=[
                errors.FieldViolation("flavor_id", "root disk must not be smaller")])


def moving(verb: str, states: Iterable[State.ValueType]) -> Check:
    """An `allowed` check: the state is one of `states` and the instance can move."""
    needs = lifecycle.needs(verb, states)

    def check(found: Instance) -> None:
        needs(found)
        move.check_movable(found, verb)

    return check


def entering(kind: MigrationInfo.Kind.ValueType, state: State.ValueType,
             new: instance_pb2.FlavorSizes | None) -> Check:
    """A `mutate`: the move's bookkeeping in `migration`, the new sizes (None: the same),
    state and task state."""
    def mutate(found: Instance) -> None:
        sizes = instance_pb2.FlavorSizes()
        sizes.CopyFrom(new if new is not None else found.flavor)
        found.migration.CopyFrom(MigrationInfo(
            kind=kind, source_node=found.node, old_flavor_id=found.flavor_id,
            new_flavor_id=sizes.flavor_id or found.flavor_id, start_time=resources.now(),
            old_flavor=found.flavor, source_root=move.root_of(found),
            stopped=found.state == Instance.STOPPED))
        found.flavor.CopyFrom(sizes)
        found.flavor_id = sizes.flavor_id or found.flavor_id
        found.state = state
        found.task_state = TaskState.TASK_STATE_RESIZE_PREP
    return mutate


async def resize(runner: Runner, principal: Principal,
                 request: instance_verbs_pb2.ResizeInstanceRequest) -> Instance:
    """Start moving an ACTIVE or STOPPED instance to another flavor (asynchronous)."""
    _check_request(request)
    current = (await instance_module.visible(runner.store, principal, request.id)).value
    new = move.sizes_of(await flavor_module.usable(runner.store, current.meta.project_id,
                                                   request.flavor_id))

    def allowed(found: Instance) -> None:
        moving("resize", _RESIZABLE)(found)
        _check_flavor(found, new)

    return instance_module.shown(await move.start(
        runner, principal, request.id, Kind.RESIZE, action="resize", allowed=allowed,
        mutate=entering(MigrationInfo.KIND_RESIZE, Instance.RESIZING, new),
        params=Operation(flavor_id=new.flavor_id),
        reserve=lambda found: move.growth(found.flavor, new)), principal)


def _awaiting(verb: str) -> Callable[[Instance], None]:
    return lifecycle.needs(verb, (Instance.VERIFY_RESIZE,))


def _task(task_state: int) -> Callable[[Instance], None]:
    def mutate(found: Instance) -> None:
        found.task_state = task_state  # type: ignore[assignment]
    return mutate


async def confirm(runner: Runner, principal: Principal,
                  request: instance_verbs_pb2.ConfirmResizeRequest) -> Instance:
    """Keep the new flavor and node of an instance in VERIFY_RESIZE; free the source."""
    resources.check_id(request.id, "id")
    return instance_module.shown(await runner.begin(
        principal, request.id, Kind.CONFIRM_RESIZE, action="confirmResize",
        allowed=_awaiting("confirm resize"),
        mutate=_task(TaskState.TASK_STATE_RESIZE_CONFIRMING)), principal)


async def revert(runner: Runner, principal: Principal,
                 request: instance_verbs_pb2.RevertResizeRequest) -> Instance:
    """Go back to the old flavor and node of an instance in VERIFY_RESIZE."""
    resources.check_id(request.id, "id")
    return instance_module.shown(await runner.begin(
        principal, request.id, Kind.REVERT_RESIZE, action="revertResize",
        allowed=_awaiting("revert resize"),
        mutate=_task(TaskState.TASK_STATE_RESIZE_REVERTING)), principal)


# --- undoing a move ----------------------------------------------------------------

async def undo(runner: Runner, op: Operation, found: Instance, destination: str,
               disks: list[str]) -> None:
    """Put the instance back on its source: the destination's domain and `disks` gone, the
    ports bound to the source, its domain running again (unless it was STOPPED), and every
    allocation but the source's released."""
    info = found.migration
    source = info.source_node
    if destination and destination != source:
        try:
            await move.destroy(runner, op, destination)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            log.warning("could not destroy the destination's domain", node=destination,
                        instance_id=found.meta.id, error=exc.message)
    for volume_id in disks:
        if volume_id and volume_id != info.source_root.volume_id:
            await move.drop_disk(runner, volume_id)
    ports = await move.bind_ports(runner, found, source)
    if not info.stopped and not await move.power_on(runner, op, source):
        connection = await move.connection_of(runner, info.source_root.attachment_id)
        spec = await move.domain_spec(runner.clients.storage, found, info.old_flavor,
                                      connection, info.source_root.volume_id, ports)
        await move.spawn(runner, op, spec, source, stopped=False)
    await move.release_except(runner, found.meta.id, source)


def back_to_source(found: Instance) -> None:
    """The record of an instance whose move was undone: source node, old flavor and disk."""
    info = MigrationInfo()
    info.CopyFrom(found.migration)
    found.node = info.source_node
    found.flavor.CopyFrom(info.old_flavor)
    found.flavor_id = info.old_flavor.flavor_id or info.old_flavor_id
    move.set_root(found, info.source_root)
    found.state = Instance.STOPPED if info.stopped else Instance.ACTIVE
    found.power_state = (Instance.POWER_STATE_SHUTDOWN if info.stopped
                         else Instance.POWER_STATE_RUNNING)
    found.ClearField("migration")
    found.ClearField("fault")  # a failed move sets its own fault after this


def _give_back(found: Instance) -> Callable[[Txn], Awaitable[None]]:
    amounts = move.growth(found.migration.old_flavor, found.flavor)

    async def writes(txn: Txn) -> None:
        await move.return_quota(txn, found.meta.project_id, amounts)
    return writes


# --- the handlers --------------------------------------------------------------------

class MoveHandler:
    """RESIZE and COLD_MIGRATE: claim, disk and ports on the destination, spawn there."""

    def __init__(self, verb: str, event: str) -> None:
        self.verb = verb
        self.event = event

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        try:
            if op.step == TaskState.TASK_STATE_RESIZE_PREP:
                found = await self._claim(runner, op, found)
            if op.step == TaskState.TASK_STATE_RESIZE_MIGRATING:
                found = await self._migrate(runner, op, found)
            if op.step == TaskState.TASK_STATE_RESIZE_FINISH:
                await self._finish(runner, op, found)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            log.warning("move failed; undoing it", operation_id=op.id, verb=self.verb,
                        instance_id=op.instance_id, reason=exc.reason, error=exc.message)
            await self.fail(runner, op, move.fault_of(self.verb, exc))

    async def _claim(self, runner: Runner, op: Operation, found: Instance) -> Instance:
        info = found.migration
        destination = await move.claim(runner, found, info.source_node, found.flavor,
                                       op.target_node)

        def chosen(record: Instance) -> None:
            record.migration.destination_node = destination

        return await runner.step(op, TaskState.TASK_STATE_RESIZE_MIGRATING, mutate=chosen,
                                 event=f"compute_{self.event}_claim",
                                 node=destination)

    async def _migrate(self, runner: Runner, op: Operation, found: Instance) -> Instance:
        info = found.migration
        destination = info.destination_node
        disk_id = info.destination_root_volume_id
        if not disk_id:
            disk_id = await move.new_disk(runner, op, found, destination)
            found = (await instance_module.fetch(runner.store, op.instance_id)).value
        await move.wait_available(runner, disk_id)
        await move.power_off(runner, op, info.source_node)
        attachment = await move.attach_root(runner, found.meta.id, disk_id, destination)
        op.progress[ATTACHMENT] = attachment.meta.id
        await move.bind_ports(runner, found, destination)
        return await runner.step(op, TaskState.TASK_STATE_RESIZE_FINISH,
                                 event=f"compute_{self.event}_finish")

    async def _finish(self, runner: Runner, op: Operation, found: Instance) -> None:
        info = found.migration
        destination, disk_id = info.destination_node, info.destination_root_volume_id
        attachment = await move.attach_root(runner, found.meta.id, disk_id, destination)
        ports = await move.bind_ports(runner, found, destination)
        await runner.save(op)  # still ours: a delete that took over must not race a spawn
        spec = await move.domain_spec(runner.clients.storage, found, found.flavor,
                                          attachment.connection, disk_id, ports)
        status = await move.spawn(runner, op, spec, destination, stopped=info.stopped)
        root = instance_pb2.AttachedVolume(volume_id=disk_id, attachment_id=attachment.meta.id,
                                           device_name=move.ROOT_DEVICE, boot=True,
                                           delete_on_termination=True)

        def verify(record: Instance) -> None:
            record.state = Instance.VERIFY_RESIZE
            record.node = destination
            record.power_state = lifecycle.power_state(status.state)
            move.set_root(record, root)
            record.migration.destination_root_volume_id = ""
            record.ClearField("fault")

        await runner.finish(op, verify)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """Undo what the move made on its destination; the instance goes back as it was."""
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        info = found.migration
        if not info.source_node:  # nothing was moved
            await runner.finish(op, lambda record: None, fault=fault)
            return
        destination = info.destination_node or found.node
        disks = [info.destination_root_volume_id, op.progress.get(move.MOVE_ROOT, "")]
        if found.root_volume_id != info.source_root.volume_id:
            disks.append(found.root_volume_id)
        await undo(runner, op, found, destination, disks)
        await runner.finish(op, back_to_source, fault=fault, extra=_give_back(found),
                            quota=True)


class ConfirmHandler:
    """CONFIRM_RESIZE: the source's domain, disk and allocation go; the move is done."""

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        info = found.migration
        try:
            if info.source_node and info.source_node != found.node:
                await move.destroy(runner, op, info.source_node)
            if info.source_root.volume_id and info.source_root.volume_id != found.root_volume_id:
                await move.drop_disk(runner, info.source_root.volume_id)
            if info.source_node and info.source_node != found.node:
                await move.release_on(runner, found.meta.id, info.source_node)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, move.fault_of("confirm resize", exc))
            return
        amounts = move.growth(found.flavor, info.old_flavor)

        def done(record: Instance) -> None:
            record.state = Instance.STOPPED if record.migration.stopped else Instance.ACTIVE
            record.ClearField("migration")

        async def writes(txn: Txn) -> None:
            await move.return_quota(txn, found.meta.project_id, amounts)

        await runner.finish(op, done, extra=writes, quota=True)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The instance stays in VERIFY_RESIZE with the fault: confirm may be asked again."""
        await runner.finish(op, lambda record: None, fault=fault)


class RevertHandler:
    """REVERT_RESIZE: the destination's domain, disk and allocation go; back to the source."""

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        try:
            await undo(runner, op, found, found.node, [found.root_volume_id])
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, move.fault_of("revert resize", exc))
            return
        await runner.finish(op, back_to_source, extra=_give_back(found), quota=True)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The instance stays in VERIFY_RESIZE with the fault: revert may be asked again."""
        await runner.finish(op, lambda record: None, fault=fault)


def register(runner: Runner) -> None:
    """The handlers of resize, cold migration, confirm and revert."""
    runner.register(Kind.RESIZE, MoveHandler("resize", "resize"))
    runner.register(Kind.COLD_MIGRATE, MoveHandler("cold migration", "migrate"))
    runner.register(Kind.CONFIRM_RESIZE, ConfirmHandler())
    runner.register(Kind.REVERT_RESIZE, RevertHandler())
