"""Cold migration, live migration and evacuation of instances (operator calls).

- MigrateInstance (cold): the resize move of services.compute.resize with the
  instance's own flavor, to the node asked for or the scheduler's choice;
  state MIGRATING, ending in VERIFY_RESIZE for ConfirmResize / RevertResize.
- LiveMigrateInstance: the domain moves while it runs (the agent's migrate
  task). Both nodes' drivers must support it: libvirt's test driver cannot,
  so a move touching a TEST node is refused up front with FAILED_PRECONDITION
  `nubis.instance.live_migration_unsupported`, before anything changes.
- EvacuateInstance: the instance of a DOWN node (its agent's lease lapsed;
  `force` skips the check) is rebuilt on another node from its image, as Nova
  does on local storage: a new claim, a new root disk, its ports bound there,
  a spawn; then the dead node's claim is released and its root disk deleted
  (the delete waits in the node's queue until the agent is back). With
  `force` the source's domain gets one try at being destroyed; otherwise
  the domain a dead node may still define when it returns is not nubis's
  any more, and the power sync reports it as unknown.
"""

from __future__ import annotations

import re

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2, instance_verbs_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, resources, tasks
from services.common.context import Principal
from services.compute import instance as instance_module
from services.compute import lifecycle, move, resize, teardown
from services.compute.operation import Fault, Kind, Operation, Runner

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
State = instance_pb2.Instance.State
TaskState = instance_pb2.Instance.TaskState
MigrationInfo = instance_pb2.MigrationInfo

LIVE_UNSUPPORTED = "nubis.instance.live_migration_unsupported"
SOURCE_UP = "nubis.instance.source_node_up"
LIVE_HYPERVISORS = frozenset({"QEMU", "KVM"})
"""libvirt driver types that can live-migrate (the test driver cannot)."""
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MIGRATABLE: tuple[State.ValueType, ...] = (Instance.ACTIVE, Instance.STOPPED)
_EVACUABLE: tuple[State.ValueType, ...] = (Instance.ACTIVE, Instance.STOPPED, Instance.ERROR)


def _check(instance_id: str, target_node: str) -> None:
    found = errors.ViolationCollector()
    if not resources.is_uuid(instance_id):
        found.add("id", "must be a UUID")
    if target_node and not _NODE.fullmatch(target_node):
        found.add("target_node", "a node name: 1-63 letters, digits or _.- starting alphanumeric")
    found.check("invalid request")


def _not_source(target_node: str, verb: str) -> resize.Check:
    """An `allowed` check: the node asked for is not the one the instance is on."""
    def check(found: Instance) -> None:
        if target_node and target_node == found.node:
            raise errors.InvalidArgument(
                f"instance {found.meta.id} is already on node {target_node}", violations=[
                    errors.FieldViolation("target_node", f"{verb} needs another node")])
    return check


async def _node(runner: Runner, name: str, field: str) -> scheduler_pb2.Node:
    try:
        return await runner.clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=name))
    except errors.NotFound:
        raise errors.NotFound(f"node {name} not found",
                              metadata={"node": name, "field": field}) from None


async def migrate(runner: Runner, principal: Principal,
                  request: instance_verbs_pb2.MigrateInstanceRequest) -> Instance:
    """Cold-migrate an ACTIVE or STOPPED instance; it ends in VERIFY_RESIZE (asynchronous)."""
    _check(request.id, request.target_node)
    if request.target_node:
        await _node(runner, request.target_node, "target_node")
    checks = (resize.moving("migrate", _MIGRATABLE), _not_source(request.target_node, "migrate"))

    def allowed(found: Instance) -> None:
        for check in checks:
            check(found)

    return instance_module.shown(await move.start(
        runner, principal, request.id, Kind.COLD_MIGRATE, action="migrate", allowed=allowed,
        mutate=resize.entering(MigrationInfo.KIND_COLD_MIGRATION, Instance.MIGRATING, None),
        params=Operation(target_node=request.target_node)), principal)


# --- live migration -----------------------------------------------------------------

def _live_capable(node: scheduler_pb2.Node, role: str) -> None:
    if node.hypervisor_type.upper() not in LIVE_HYPERVISORS:
        raise errors.FailedPrecondition(
            f"the {role} node {node.name} runs libvirt's {node.hypervisor_type or 'unknown'} "
            "driver, which cannot live-migrate a domain; migrate it cold (MigrateInstance)",
            reason=LIVE_UNSUPPORTED,
            metadata={"node": node.name, "hypervisor_type": node.hypervisor_type})


async def live_migrate(runner: Runner, principal: Principal,
                       request: instance_verbs_pb2.LiveMigrateInstanceRequest) -> Instance:
    """Move a running instance to another node without stopping it (asynchronous).

    Refused before anything changes when either node's driver cannot.
    """
    _check(request.id, request.target_node)
    current = (await instance_module.visible(runner.store, principal, request.id)).value
    active = lifecycle.needs("live migrate", (Instance.ACTIVE,))
    active(current)
    move.check_movable(current, "live migration")
    _live_capable(await _node(runner, current.node, "id"), "source")
    if request.target_node:
        _live_capable(await _node(runner, request.target_node, "target_node"), "destination")
    checks = (active, _not_source(request.target_node, "live migrate"))

    def allowed(found: Instance) -> None:
        for check in checks:
            check(found)

    def mutate(found: Instance) -> None:
        found.migration.CopyFrom(MigrationInfo(
            kind=MigrationInfo.KIND_LIVE_MIGRATION, source_node=found.node,
            old_flavor_id=found.flavor_id, new_flavor_id=found.flavor_id,
            start_time=resources.now(), source_root=move.root_of(found)))
        found.state = Instance.MIGRATING
        found.task_state = TaskState.TASK_STATE_MIGRATING

    return instance_module.shown(await move.start(
        runner, principal, request.id, Kind.LIVE_MIGRATE, action="live-migration",
        allowed=allowed, mutate=mutate, params=Operation(
            target_node=request.target_node, block_migration=request.block_migration)),
        principal)


class LiveMigrateHandler:
    """LIVE_MIGRATE: claim, disk and ports on the destination, the agent's migrate, release."""

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        info = found.migration
        try:
            destination = await move.claim(runner, found, info.source_node, found.flavor,
                                           op.target_node)
            source_node = await _node(runner, info.source_node, "id")
            target = await _node(runner, destination, "target_node")
            _live_capable(source_node, "source")
            _live_capable(target, "destination")
            await runner.step(op, op.step, node=destination, event="compute_live_migration")
            disk_id = info.destination_root_volume_id or await move.new_disk(
                runner, op, found, destination)
            await move.wait_available(runner, disk_id)
            attachment = await move.attach_root(runner, found.meta.id, disk_id, destination)
            ports = await move.bind_ports(runner, found, destination)
            spec = await move.domain_spec(runner.clients.storage, found, found.flavor,
                                          attachment.connection, disk_id, ports)
            status = await runner.send(op, tasks.MIGRATE, tasks_pb2.MigrateRequest(
                name=spec.name, destination_uri=f"qemu+tcp://{destination}/system",
                block_migration=op.block_migration, destination=spec), node=info.source_node)
            await move.drop_disk(runner, info.source_root.volume_id)
            await move.release_on(runner, found.meta.id, info.source_node)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, move.fault_of("live migration", exc))
            return
        root = instance_pb2.AttachedVolume(volume_id=disk_id, attachment_id=attachment.meta.id,
                                           device_name=move.ROOT_DEVICE, boot=True,
                                           delete_on_termination=True)

        def moved(record: Instance) -> None:
            record.state = Instance.ACTIVE
            record.node = destination
            record.power_state = lifecycle.power_state(status.state)
            move.set_root(record, root)
            record.ClearField("migration")

        await runner.finish(op, moved)

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The domain stays on the source: the destination's disk, ports and claim go back."""
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        await resize.undo(runner, op, found, found.migration.destination_node,
                          [found.migration.destination_root_volume_id,
                           op.progress.get(move.MOVE_ROOT, "")])
        await runner.finish(op, resize.back_to_source, fault=fault)


# --- evacuation ---------------------------------------------------------------------

async def evacuate(runner: Runner, principal: Principal,
                   request: instance_verbs_pb2.EvacuateInstanceRequest) -> Instance:
    """Rebuild the instance of a DOWN node on another node (asynchronous)."""
    _check(request.id, request.target_node)
    current = (await instance_module.visible(runner.store, principal, request.id)).value
    if request.target_node:
        await _node(runner, request.target_node, "target_node")
    if current.node and not request.force:
        source = await _node(runner, current.node, "id")
        if source.state != scheduler_pb2.NODE_STATE_DOWN:
            raise errors.FailedPrecondition(
                f"node {source.name} is {scheduler_pb2.NodeState.Name(source.state)}: "
                "evacuate moves instances off a dead node (set force if it is dead "
                "but its lease has not lapsed yet)", reason=SOURCE_UP,
                metadata={"node": source.name, "id": current.meta.id})
    checks = (resize.moving("evacuate", _EVACUABLE), _not_source(request.target_node, "evacuate"))

    def allowed(found: Instance) -> None:
        for check in checks:
            check(found)

    def mutate(found: Instance) -> None:
        found.migration.CopyFrom(MigrationInfo(
            kind=MigrationInfo.KIND_EVACUATION, source_node=found.node,
            old_flavor_id=found.flavor_id, new_flavor_id=found.flavor_id,
            start_time=resources.now(), source_root=move.root_of(found),
            stopped=found.state == Instance.STOPPED))
        found.state = Instance.MIGRATING
        found.task_state = TaskState.TASK_STATE_REBUILDING

    return instance_module.shown(await move.start(
        runner, principal, request.id, Kind.EVACUATE, action="evacuate", allowed=allowed,
        mutate=mutate, params=Operation(target_node=request.target_node, force=request.force,
                                        image_id=current.image_id)), principal)


class EvacuateHandler:
    """EVACUATE: claim, new root disk, ports and spawn on the destination; source released."""

    async def run(self, runner: Runner, op: Operation) -> None:
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        info = found.migration
        try:
            destination = info.destination_node or await self._claim(runner, op, found)
            found = (await instance_module.fetch(runner.store, op.instance_id)).value
            disk_id = found.migration.destination_root_volume_id or await move.new_disk(
                runner, op, found, destination)
            await move.wait_available(runner, disk_id)
            attachment = await move.attach_root(runner, found.meta.id, disk_id, destination)
            ports = await move.bind_ports(runner, found, destination)
            await runner.save(op)
            spec = await move.domain_spec(runner.clients.storage, found, found.flavor,
                                          attachment.connection, disk_id, ports)
            status = await move.spawn(runner, op, spec, destination, stopped=info.stopped)
            if op.force:  # the node may still run: one try at its domain, no more
                await teardown.destroy_domain(runner, op, info.source_node)
            await move.release_on(runner, found.meta.id, info.source_node)
            await move.drop_disk(runner, info.source_root.volume_id)
        except errors.NubisError as exc:
            if move.transient(exc):
                raise
            await self.fail(runner, op, move.fault_of("evacuation", exc))
            return
        root = instance_pb2.AttachedVolume(volume_id=disk_id, attachment_id=attachment.meta.id,
                                           device_name=move.ROOT_DEVICE, boot=True,
                                           delete_on_termination=True)

        def rebuilt(record: Instance) -> None:
            record.state = Instance.STOPPED if info.stopped else Instance.ACTIVE
            record.node = destination
            record.power_state = lifecycle.power_state(status.state)
            move.set_root(record, root)
            record.ClearField("fault")
            record.ClearField("migration")

        await runner.finish(op, rebuilt)

    async def _claim(self, runner: Runner, op: Operation, found: Instance) -> str:
        destination = await move.claim(runner, found, found.migration.source_node,
                                       found.flavor, op.target_node)

        def chosen(record: Instance) -> None:
            record.migration.destination_node = destination

        await runner.step(op, op.step, mutate=chosen, node=destination,
                          event="compute_rebuild_claim")
        return destination

    async def fail(self, runner: Runner, op: Operation, fault: Fault) -> None:
        """The destination's claim and disk go back; the instance is ERROR on its dead node."""
        found = (await instance_module.fetch(runner.store, op.instance_id)).value
        info = found.migration
        for volume_id in (info.destination_root_volume_id, op.progress.get(move.MOVE_ROOT, "")):
            if volume_id:
                await move.drop_disk(runner, volume_id)
        if info.source_node:
            await move.release_except(runner, found.meta.id, info.source_node)

        def broken(record: Instance) -> None:
            record.state = Instance.ERROR
            record.ClearField("migration")

        await runner.finish(op, broken, fault=fault)


def register(runner: Runner) -> None:
    """The handlers of live migration and evacuation (cold migration is resize's move)."""
    runner.register(Kind.LIVE_MIGRATE, LiveMigrateHandler())
    runner.register(Kind.EVACUATE, EvacuateHandler())
