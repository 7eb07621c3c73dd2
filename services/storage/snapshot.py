"""Snapshots: full, separate copies of a volume in its pool, made by the agent's clone.

A snapshot is external: libvirt copies the volume into ``snapshot-<id>``
(virStorageVolCreateXMLFrom) and the copy never changes again. Volumes made
from it are thin qcow2 overlays backed by it, so it cannot be deleted while
one exists (index ``storage/snapshot-users/<snapshot>/<volume>``), and its
volume cannot be deleted while it has snapshots (``storage/volume-snapshots/
<volume>/<snapshot>``). Each index key is written with a write of the record
it protects, so a racing delete's compare fails and it sees the new key.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf import wrappers_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import snapshot_pb2, storage_service_pb2

from services.common import errors, filtering, pages, quota, requests, resources, tasks
from services.common.store import Store, Txn
from services.storage import keys, operation, volume, volume_ops

Snapshot = snapshot_pb2.Snapshot
Volume = volume.Volume
Kind = operation.Kind
PAGE_LISTING = "snapshots"
CREATE_METHOD = resources.method(storage_service_pb2.DESCRIPTOR, "StorageService",
                                 "CreateSnapshot")
IN_USE = "nubis.snapshot.in_use"
_STATES = filtering.enum_names(Snapshot.State.DESCRIPTOR)
_SNAPSHOTTABLE = (Volume.AVAILABLE,)
_SNAPSHOTTABLE_FORCED = (Volume.AVAILABLE, Volume.IN_USE, Volume.RESERVED, Volume.ATTACHING,
                         Volume.DETACHING)


def libvirt_name(snapshot_id: str) -> str:
    return f"snapshot-{snapshot_id}"


def not_found(snapshot_id: str) -> errors.NotFound:
    return errors.NotFound(f"snapshot {snapshot_id} not found", metadata={"id": snapshot_id})


def redact(snapshot: Snapshot) -> Snapshot:
    snapshot.ClearField("node")
    snapshot.ClearField("pool_id")
    return snapshot


async def fetch(store: Store, snapshot_id: str) -> Snapshot:
    resources.check_id(snapshot_id)
    found = await store.find(keys.snapshot(snapshot_id), Snapshot)
    if found is None:
        raise not_found(snapshot_id)
    found.value.meta.revision = found.mod_revision
    return found.value


def _put(txn: Txn, snapshot: Snapshot) -> None:
    snapshot.meta.revision = 0
    snapshot.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.snapshot(snapshot.meta.id), snapshot)


class _DryRun(Exception):
    """validate_only: every check passed; nothing may commit."""


async def create(runner: operation.Runner, request: snapshot_pb2.CreateSnapshotRequest,
                 project_id: str, check_visible: Callable[[Volume], None]) -> Snapshot:
    """Record the snapshot CREATING (quota `snapshots` reserved); the node copies the volume."""
    store = runner.store
    wanted = request.snapshot
    problems = errors.ViolationCollector()
    resources.check_name(problems, "snapshot.meta.name", wanted.meta.name)
    resources.check_labels(problems, "snapshot.meta.labels", dict(wanted.meta.labels))
    if not resources.is_uuid(wanted.volume_id):
        problems.add("snapshot.volume_id", "must be a UUID")
    problems.check("invalid snapshot")
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    source = await volume.fetch(store, wanted.volume_id)
    check_visible(source)
    record = Snapshot(meta=resources.fresh_meta(wanted.meta, project_id), state=Snapshot.CREATING,
                      volume_id=source.meta.id, size_gb=source.size_gb, node=source.node,
                      pool_id=source.pool_id)
    op = await runner.new(Kind.CREATE_SNAPSHOT, record.meta.id, project_id, source.node)
    allowed = _SNAPSHOTTABLE_FORCED if request.force else _SNAPSHOTTABLE

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        current = await volume.in_txn(txn, source.meta.id)
        if current.state not in allowed:
            raise volume.bad_state(current, "snapshot it" + (
                "" if request.force else " (an attached volume needs force)"))
        await quota.reserve(txn, project_id, {"snapshots": 1})
        if request.validate_only:
            raise _DryRun
        # Writing the volume makes a racing DeleteVolume's compare fail, so it
        # sees this snapshot when it runs again.
        volume.put(txn, current)
        txn.put(keys.volume_snapshot(current.meta.id, record.meta.id),
                wrappers_pb2.StringValue(value=record.meta.id))
        txn.create(keys.snapshot(record.meta.id), record)
        txn.put(keys.operation(record.meta.id), op)
        await requests.remember(txn, idempotency, record.meta.id)
        return record.meta.id

    try:
        async with runner.turn(project_id):
            made = await store.atomic(body, deadline=operation.patience())
    except _DryRun:
        record.meta.id = ""
        return record
    if made == record.meta.id:
        runner.start(op)
    return await fetch(store, made)


def snapshot_filter(text: str, *, admin: bool) -> filtering.Filter:
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(_STATES), "volume_id": None}
    if admin:
        keys_["project_id"] = None
    return filtering.parse(text, keys_)


async def list_snapshots(store: Store, project_id: str | None,
                         request: snapshot_pb2.ListSnapshotsRequest,
                         *, admin: bool) -> tuple[list[Snapshot], str]:
    size = pages.page_size(request.page_size)
    wanted = snapshot_filter(request.filter, admin=admin)
    pages.cursor(request.page_token, PAGE_LISTING, resources.is_uuid)
    items, _ = await store.list_all(keys.SNAPSHOTS, Snapshot)
    chosen = []
    for item in items:
        snap = item.value
        if project_id is not None and snap.meta.project_id != project_id:
            continue
        fields = {"name": snap.meta.name, "volume_id": snap.volume_id,
                  "project_id": snap.meta.project_id,
                  "state": filtering.enum_name(Snapshot.State.DESCRIPTOR, snap.state)}
        if wanted.matches(fields, snap.meta.labels):
            snap.meta.revision = item.mod_revision
            chosen.append(snap)
    return pages.page_of(chosen, lambda snap: snap.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)


_UPDATABLE = ("name", "description", "labels")


async def update(store: Store, request: snapshot_pb2.UpdateSnapshotRequest,
                 check_visible: Callable[[Snapshot], None]) -> Snapshot:
    paths = resources.check_mask(request.update_mask.paths, _UPDATABLE)
    change = request.snapshot
    problems = errors.ViolationCollector()
    if "name" in paths:
        resources.check_name(problems, "snapshot.meta.name", change.meta.name)
    if "labels" in paths:
        resources.check_labels(problems, "snapshot.meta.labels", dict(change.meta.labels))
    problems.check("invalid snapshot update")
    resources.check_id(change.meta.id, "snapshot.meta.id")

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.snapshot(change.meta.id), Snapshot)
        if found is None:
            raise not_found(change.meta.id)
        check_visible(found.value)
        if change.meta.revision and found.mod_revision != change.meta.revision:
            raise errors.Conflict(f"snapshot {change.meta.id} changed since revision "
                                  f"{change.meta.revision}", reason="nubis.revision_mismatch")
        snap = found.value
        for path in paths:
            if path == "labels":
                snap.meta.labels.clear()
                snap.meta.labels.update(change.meta.labels)
            else:
                setattr(snap.meta, path, getattr(change.meta, path))
        _put(txn, snap)

    await store.atomic(body, deadline=operation.patience())
    return await fetch(store, change.meta.id)


async def delete(runner: operation.Runner, request: snapshot_pb2.DeleteSnapshotRequest,
                 check_visible: Callable[[Snapshot], None], *, admin: bool) -> Snapshot:
    """DELETING, then the node removes the copy; refused while volumes are made from it."""
    store = runner.store
    resources.check_id(request.id)
    if request.revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation("revision", "must not be negative")])
    if request.force and not admin:
        raise errors.PermissionDenied("force needs the cloud-admin role",
                                      reason="nubis.policy.denied",
                                      metadata={"required_role": "cloud-admin"})
    started: list[operation.Operation] = []

    async def body(txn: Txn) -> None:
        started.clear()
        found = await txn.get(keys.snapshot(request.id), Snapshot)
        if found is None:
            raise not_found(request.id)
        snap = found.value
        check_visible(snap)
        if request.revision and found.mod_revision != request.revision:
            raise errors.Conflict(f"snapshot {request.id} changed since revision "
                                  f"{request.revision}", reason="nubis.revision_mismatch")
        if snap.state == Snapshot.DELETING:
            return
        if snap.state not in (Snapshot.AVAILABLE, Snapshot.ERROR) and not request.force:
            raise errors.FailedPrecondition(
                f"snapshot {snap.meta.id} is {Snapshot.State.Name(snap.state)}: cannot delete it",
                reason="nubis.snapshot.state", metadata={"id": snap.meta.id})
        # Never with dependents, even forced: their data is this snapshot's.
        users = await store.list(keys.snapshot_users(snap.meta.id), wrappers_pb2.StringValue,
                                 page_size=1)
        if users.items:
            raise errors.FailedPrecondition(
                f"snapshot {snap.meta.id} has volumes made from it (e.g. "
                f"{users.items[0].value.value}): delete them first", reason=IN_USE,
                metadata={"id": snap.meta.id, "volume_id": users.items[0].value.value})
        op = await runner.new(Kind.DELETE_SNAPSHOT, snap.meta.id, snap.meta.project_id,
                              snap.node)
        snap.state = Snapshot.DELETING
        _put(txn, snap)
        txn.put(keys.operation(snap.meta.id), op)
        started.append(op)

    await store.atomic(body, deadline=operation.patience())
    for op in started:
        runner.start(op)
    return await fetch(store, request.id)


async def _volume_pool(runner: operation.Runner, snap: Snapshot) -> str:
    found = await runner.store.find(keys.volume(snap.volume_id), Volume)
    return found.value.pool_name if found is not None else ""


async def _to_error(runner: operation.Runner, op: operation.Operation,
                    fault: resource_pb2.Fault) -> None:
    async def writes(txn: Txn) -> None:
        found = await txn.get(keys.snapshot(op.resource_id), Snapshot)
        if found is None:
            return
        snap = found.value
        snap.state = Snapshot.ERROR
        snap.fault.CopyFrom(fault)
        _put(txn, snap)

    await runner.finish(op, writes)


class CreateSnapshot:
    """CREATING → AVAILABLE: the agent clones the volume into snapshot-<id>."""

    async def run(self, runner: operation.Runner, op: operation.Operation) -> None:
        found = await runner.store.find(keys.snapshot(op.resource_id), Snapshot)
        if found is None or found.value.state != Snapshot.CREATING:
            await runner.finish(op, _nothing)
            return
        snap = found.value
        try:
            await runner.send(op, tasks.SNAPSHOT_VOLUME, tasks_pb2.SnapshotVolumeRequest(
                pool=await _volume_pool(runner, snap), volume_name=volume.libvirt_name(
                    snap.volume_id), snapshot_name=libvirt_name(snap.meta.id)))
        except errors.NubisError as exc:
            if not volume_ops.is_agent_failure(exc):
                raise
            await self.fail(runner, op, operation.fault_of(exc))
            return

        async def writes(txn: Txn) -> None:
            current = await txn.get(keys.snapshot(op.resource_id), Snapshot)
            if current is None or current.value.state != Snapshot.CREATING:
                return
            current.value.state = Snapshot.AVAILABLE
            _put(txn, current.value)

        await runner.finish(op, writes)

    async def fail(self, runner: operation.Runner, op: operation.Operation,
                   fault: resource_pb2.Fault) -> None:
        await _to_error(runner, op, fault)


class DeleteSnapshot:
    """DELETING → gone: the agent removes snapshot-<id>; its index key and quota go with it."""

    async def run(self, runner: operation.Runner, op: operation.Operation) -> None:
        found = await runner.store.find(keys.snapshot(op.resource_id), Snapshot)
        if found is None or found.value.state != Snapshot.DELETING:
            await runner.finish(op, _nothing)
            return
        snap = found.value
        try:
            await volume_ops.delete_on_node(runner, op, await _volume_pool(runner, snap),
                                            libvirt_name(snap.meta.id))
        except errors.NubisError as exc:
            if not volume_ops.is_agent_failure(exc):
                raise
            await self.fail(runner, op, operation.fault_of(exc))
            return

        async def writes(txn: Txn) -> None:
            current = await txn.get(keys.snapshot(op.resource_id), Snapshot)
            if current is None:
                return
            txn.delete(keys.snapshot(snap.meta.id))
            txn.delete(keys.volume_snapshot(snap.volume_id, snap.meta.id))
            await quota.release(txn, snap.meta.project_id, {"snapshots": 1})

        await runner.finish(op, writes)

    async def fail(self, runner: operation.Runner, op: operation.Operation,
                   fault: resource_pb2.Fault) -> None:
        await _to_error(runner, op, fault)


async def _nothing(txn: Txn) -> None:
    return None


def register(runner: operation.Runner) -> None:
    runner.register(Kind.CREATE_SNAPSHOT, CreateSnapshot())
    runner.register(Kind.DELETE_SNAPSHOT, DeleteSnapshot())
