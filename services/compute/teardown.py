"""Deleting an instance, and giving back what one build attempt took on a node.

DeleteInstance works from any state. With nothing in flight it writes the
DELETE operation itself; with an operation in flight (a build still going, a
reboot) it turns that operation's record into a DELETE (`Runner.hand_over`):
the runner of the old operation goes on with the teardown at its next write,
knowing every port and disk it made so far, so nothing a half-done step made
is missed. An admin's `force` takes the operation over here at once.

The teardown, every step idempotent (run again after an adoption):
destroy the domain on the node, detach the volumes hot-plugged into it (they are
kept, AVAILABLE again), detach and delete the root disk, delete the
ports compute created (unbind the caller's own), release the claim, then one
transaction removes the instance record (watchers see DELETED), gives back the
quota it still holds, ends the action and drops the operation record.

The same steps, minus the record removal, roll back a build attempt
(`release_attempt`, `release_ports`), used by services.compute.build.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable

import structlog
from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2
from nubis.network.v1 import port_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import attachment_pb2, volume_pb2

from services.common import errors, policy, quota, tasks
from services.common.context import Principal
from services.common.store import Txn
from services.compute import block_devices, instance, move, operation

log = structlog.get_logger(__name__)

Instance = instance_pb2.Instance
Operation = operation.Operation
Kind = operation.Kind
ROOT = "root_volume"
ATTACHMENT = "attachment"
# Seconds between two looks at a root disk being deleted.
_POLL = 0.2
# Storage's refusal to delete a volume in a passing state (its reason, part of its API),
# and the states a root disk leaves on its own (a node making, growing or plugging it).
_VOLUME_STATE = "nubis.volume.state"
_SETTLING_DISK = frozenset({"CREATING", "EXTENDING", "ATTACHING", "DETACHING"})
# Seconds a delete waits for a root disk still being made (an image copy on a busy node).
DISK_PATIENCE = 300.0
# Seconds a forced delete waits for the node to destroy the domain.
FORCE_WAIT = 15.0


def port_key(index: int) -> str:
    """The progress key of the port of NIC `index`."""
    return f"port.{index}"


def created_port(record: Instance, index: int) -> bool:
    """Whether compute made the port of NIC `index` (else the caller gave it)."""
    return record.networks[index].WhichOneof("target") != "port_id"


async def delete(runner: operation.Runner, principal: Principal,
                 request: instance_requests_pb2.DeleteInstanceRequest) -> Instance:
    """Move the instance to DELETING and tear it down in the background."""
    found = await instance.visible(runner.store, principal, request.id)
    take = request.force and policy.is_cloud_admin(principal)

    async def body(txn: Txn) -> tuple[Instance, Operation | None]:
        current = await instance.in_txn(txn, request.id)
        if request.revision and request.revision != current.mod_revision:
            raise errors.Conflict(f"instance {request.id} changed since revision "
                                  f"{request.revision}", metadata={"id": request.id})
        record = current.value
        if record.state == Instance.DELETING and not take:
            return record, None  # already being deleted
        record.state = Instance.DELETING
        record.task_state = Instance.TASK_STATE_DELETING
        handed = await runner.hand_over(txn, request.id, Kind.DELETE, take=take)
        if handed is not None:
            instance.put(txn, record)
            return record, handed if take else None
        started = await runner.record(txn, record, Kind.DELETE, action_name="delete",
                                      principal=principal,
                                      params=Operation(node=record.node, force=request.force))
        return started.instance, started.op

    del found
    written, op = await runner.store.atomic(body, deadline=operation.patience())
    if op is not None:
        runner.start(op)
    return instance.shown(written, principal)


# --- the steps, each idempotent ---


async def destroy_domain(runner: operation.Runner, op: Operation, node: str) -> None:
    """The instance's domain gone from `node` (a node that never answers is left to reconcile)."""
    request = tasks_pb2.DestroyRequest(name=instance.domain_name(op.instance_id))
    try:
        if op.force:  # an admin's force: one try, however long the node stays away
            await runner.sender.send(node, tasks.DESTROY, request, deadline=FORCE_WAIT,
                                     operation_id=tasks.OperationId(op.id))
        else:
            await runner.send(op, tasks.DESTROY, request, node=node)
    except errors.NotFound:
        pass
    except errors.Unavailable as exc:
        if exc.reason != operation.NODE_UNAVAILABLE and "node" not in exc.metadata:
            raise
        log.warning("node did not answer destroy; its reconcile reports the domain",
                    instance_id=op.instance_id, node=node)


async def _ignore_missing(call: Awaitable[object]) -> None:
    with contextlib.suppress(errors.NotFound):
        await call


async def _delete_disk(runner: operation.Runner, volume_id: str) -> None:
    """Delete the volume; one still being made (a delete while building) or changed is
    waited for, up to DISK_PATIENCE, since storage deletes only a settled volume."""
    give_up = time.monotonic() + DISK_PATIENCE
    while True:
        try:
            await runner.clients.storage.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=volume_id))
            return
        except errors.NotFound:
            return
        except errors.FailedPrecondition as refused:
            settling = (refused.reason == _VOLUME_STATE
                        and refused.metadata.get("state") in _SETTLING_DISK)
            if not settling or time.monotonic() > give_up:
                raise
        await asyncio.sleep(_POLL)


async def remove_root_disk(runner: operation.Runner, op: Operation, record: Instance,
                           *, wait: bool) -> None:
    """Detach the root disk; delete it if compute made it (`wait`: until it is gone)."""
    storage = runner.clients.storage
    attachment_id = op.progress.get(ATTACHMENT, "")
    if attachment_id:
        await _ignore_missing(storage.CompleteDetach(
            attachment_pb2.CompleteDetachRequest(attachment_id=attachment_id)))
    volume_id = op.progress.get(ROOT, "") or (record.root_volume_id if record.image_id else "")
    if volume_id and record.image_id:
        await _delete_disk(runner, volume_id)
        while wait:
            try:
                await storage.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id))
            except errors.NotFound:
                break
            await asyncio.sleep(_POLL)
    op.progress.pop(ATTACHMENT, None)
    op.progress.pop(ROOT, None)


async def detach_data_volumes(runner: operation.Runner, record: Instance) -> None:
    """End the attachment of every volume attached besides the root disk (the domain is
    gone, so nothing uses them): they stay, AVAILABLE for another server."""
    for attached in record.volumes:
        if attached.attachment_id and not attached.boot:
            await _ignore_missing(runner.clients.storage.CompleteDetach(
                attachment_pb2.CompleteDetachRequest(attachment_id=attached.attachment_id)))


async def release_ports(runner: operation.Runner, op: Operation, record: Instance,
                        *, keep: bool) -> None:
    """Unbind every NIC's port; unless `keep`, delete the ports compute made."""
    network = runner.clients.network
    for index in range(len(record.networks)):
        port_id = op.progress.get(port_key(index), "")
        if not port_id:
            continue
        if created_port(record, index) and not keep:
            await _ignore_missing(network.DeletePort(
                port_pb2.DeletePortRequest(id=port_id, force=True)))
            op.progress.pop(port_key(index), None)
        else:
            await _ignore_missing(network.UnbindPort(
                port_pb2.UnbindPortRequest(id=port_id, keep_device=keep)))
            if not keep:
                op.progress.pop(port_key(index), None)


async def release_claim(runner: operation.Runner, op: Operation, node: str = "") -> None:
    await _ignore_missing(runner.clients.scheduler.ReleaseAllocations(
        scheduler_pb2.ReleaseAllocationsRequest(consumer_id=op.instance_id, node_name=node)))


async def release_attempt(runner: operation.Runner, op: Operation, record: Instance) -> None:
    """What one build attempt took on `op.node`: domain, root disk, bindings, claim."""
    if op.node:
        await destroy_domain(runner, op, op.node)
    # A DOWN node's disk is left DELETING to storage: waiting for it would outlast the node.
    down = bool(op.node) and await runner.liveness.down(op.node)
    await remove_root_disk(runner, op, record, wait=not down)
    await release_ports(runner, op, record, keep=True)
    if op.node:
        await release_claim(runner, op, op.node)


def give_back(record: Instance) -> operation.Writes:
    """`extra` of an outcome that gives the instance's quota back (once)."""
    async def writes(txn: Txn) -> None:
        if not record.quota_released:
            await quota.release(txn, record.meta.project_id, instance.usage(record))

    return writes


def _known(op: Operation, record: Instance) -> None:
    """What the instance record knows of its ports and disks, where the operation does not."""
    for index, port_id in enumerate(record.port_ids):
        op.progress.setdefault(port_key(index), port_id)
    if record.volumes and record.volumes[0].attachment_id:
        op.progress.setdefault(ATTACHMENT, record.volumes[0].attachment_id)
    if record.root_volume_id:
        op.progress.setdefault(ROOT, record.root_volume_id)
    op.node = op.node or record.node


class Delete:
    """The DELETE handler."""

    async def run(self, runner: operation.Runner, op: Operation) -> None:
        record = (await instance.fetch(runner.store, op.instance_id)).value
        _known(op, record)
        if op.node:
            await destroy_domain(runner, op, op.node)
        await move.remove_leftovers(runner, op, record)  # a resize or migration's other node
        await detach_data_volumes(runner, record)
        await block_devices.release(runner, op, record, unrecorded=True)  # a build's, mid-way
        await remove_root_disk(runner, op, record, wait=False)
        await release_ports(runner, op, record, keep=False)
        await release_claim(runner, op)
        await runner.finish(op, lambda found: None, extra=give_back(record), quota=True,
                            remove=True)

    async def fail(self, runner: operation.Runner, op: Operation,
                   fault: operation.Fault) -> None:
        """A teardown that cannot go on: the instance stays DELETING-ERROR for a retry."""
        def mutate(found: Instance) -> None:
            found.state = Instance.ERROR

        await runner.finish(op, mutate, fault=fault)


def register(runner: operation.Runner) -> None:
    runner.register(Kind.DELETE, Delete())
