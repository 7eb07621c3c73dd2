"""Volumes: block devices in one node's pool, blank or made from an image or a snapshot.

States: CREATING → AVAILABLE → RESERVED/ATTACHING → IN_USE → DETACHING →
AVAILABLE → DELETING, EXTENDING from AVAILABLE and back, ERROR with a fault.
Each transient state is entered in one transaction with its operation record
(`operation`) and left in the one that records the outcome. Quota (volumes,
volume_gb) is reserved in the create's transaction and released in the one
that removes the record after the agent deleted the volume; root disks made
by CreateRootDisk count against the instance's flavor, not volume quota.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import message, wrappers_pb2
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.storage.v1 import (
    attachment_pb2,
    image_pb2,
    snapshot_pb2,
    storage_service_pb2,
    volume_pb2,
)

from services.common import errors, filtering, pages, quota, requests, resources
from services.common.store import Store, Txn, Versioned
from services.storage import image, keys, operation, pool

Volume = volume_pb2.Volume
Kind = operation.Kind
GIB = pool.GIB
MAX_SIZE_GB = 65536
# Characters of a guest device name ("vda", "vdb", ...).
MAX_DEVICE_NAME = 32
PAGE_LISTING = "volumes"
CREATE_METHOD = resources.method(storage_service_pb2.DESCRIPTOR, "StorageService", "CreateVolume")
ROOT_DISK_METHOD = resources.method(storage_service_pb2.DESCRIPTOR, "StorageService",
                                    "CreateRootDisk")
ATTACHED = "nubis.volume.attached"
HAS_SNAPSHOTS = "nubis.volume.has_snapshots"
BAD_STATE = "nubis.volume.state"
# Fields only cloud-admins and services see: where the data lives.
_PLACEMENT_FIELDS = ("node", "pool_id", "pool_name", "libvirt_name", "path", "format")
_STATES = filtering.enum_names(Volume.State.DESCRIPTOR)


def libvirt_name(volume_id: str) -> str:
    return f"volume-{volume_id}"


def not_found(volume_id: str) -> errors.NotFound:
    return errors.NotFound(f"volume {volume_id} not found", metadata={"id": volume_id})


def bad_state(volume: Volume, doing: str) -> errors.FailedPrecondition:
    state = Volume.State.Name(volume.state)
    return errors.FailedPrecondition(
        f"volume {volume.meta.id} is {state}: cannot {doing}", reason=BAD_STATE,
        metadata={"id": volume.meta.id, "state": state})


def redact(volume: Volume) -> Volume:
    """The volume as a project's users see it (no node, pool or path)."""
    for name in _PLACEMENT_FIELDS:
        volume.ClearField(name)  # type: ignore[arg-type]
    return volume


async def fetch(store: Store, volume_id: str) -> Volume:
    resources.check_id(volume_id)
    found = await store.find(keys.volume(volume_id), Volume)
    if found is None:
        raise not_found(volume_id)
    volume = found.value
    volume.meta.revision = found.mod_revision
    return volume


async def in_txn(txn: Txn, volume_id: str) -> Volume:
    """The volume as `txn` reads it (its revision compared at commit)."""
    found = await txn.get(keys.volume(volume_id), Volume)
    if found is None:
        raise not_found(volume_id)
    return found.value


def put(txn: Txn, volume: Volume) -> None:
    volume.meta.revision = 0
    volume.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.volume(volume.meta.id), volume)


def _ceil_gb(size_bytes: int) -> int:
    return -(-size_bytes // GIB)


def _check_new(volume: Volume, *, admin: bool) -> None:
    problems = errors.ViolationCollector()
    resources.check_name(problems, "volume.meta.name", volume.meta.name)
    resources.check_labels(problems, "volume.meta.labels", dict(volume.meta.labels))
    if not 1 <= volume.size_gb <= MAX_SIZE_GB:
        problems.add("volume.size_gb", f"1 to {MAX_SIZE_GB} GiB")
    source = volume.WhichOneof("source")
    if source == "source_volume_id":
        problems.add("volume.source_volume_id",
                     "cloning a volume is not supported: snapshot it, then make the volume "
                     "from the snapshot")
    elif source is not None and not resources.is_uuid(getattr(volume, source)):
        problems.add(f"volume.{source}", "must be a UUID")
    if volume.pool_id and not resources.is_uuid(volume.pool_id):
        problems.add("volume.pool_id", "must be a UUID")
    problems.check("invalid volume")
    if (volume.node or volume.pool_id) and not admin:
        raise errors.PermissionDenied("only cloud-admins choose a volume's node or pool",
                                      reason="nubis.policy.denied",
                                      metadata={"required_role": "cloud-admin"})


class _ImageMoved(Exception):
    """The image changed between `image.usable` and the commit: check it again."""


async def _check_image_in(txn: Txn, image_id: str, revision: int) -> None:
    """Compare the image at the revision `usable` judged it on; a change reruns the check."""
    found = await txn.get(keys.image(image_id), image_pb2.Image)
    if found is None or found.mod_revision != revision:
        raise _ImageMoved(image_id)


async def _source_snapshot(store: Store, project_id: str,
                           snapshot_id: str) -> snapshot_pb2.Snapshot:
    found = await store.find(keys.snapshot(snapshot_id), snapshot_pb2.Snapshot)
    if found is None or found.value.meta.project_id != project_id:
        raise errors.NotFound(f"snapshot {snapshot_id} not found", metadata={"id": snapshot_id})
    if found.value.state != snapshot_pb2.Snapshot.AVAILABLE:
        raise errors.FailedPrecondition(
            f"snapshot {snapshot_id} is {snapshot_pb2.Snapshot.State.Name(found.value.state)}",
            reason="nubis.snapshot.state", metadata={"id": snapshot_id})
    return found.value


async def _use_snapshot_in(txn: Txn, snapshot_id: str, volume_id: str) -> None:
    found = await txn.get(keys.snapshot(snapshot_id), snapshot_pb2.Snapshot)
    if found is None or found.value.state != snapshot_pb2.Snapshot.AVAILABLE:
        raise errors.FailedPrecondition(f"snapshot {snapshot_id} is no longer available",
                                        reason="nubis.snapshot.state",
                                        metadata={"id": snapshot_id})
    # Writing the snapshot makes a racing DeleteSnapshot's compare fail, so it
    # sees this volume among its dependents when it runs again.
    found.value.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.snapshot(snapshot_id), found.value)
    txn.put(keys.snapshot_user(snapshot_id, volume_id), wrappers_pb2.StringValue(value=volume_id))


class _DryRun(Exception):
    """validate_only: every check passed; nothing may commit."""


async def create(runner: operation.Runner, request: volume_pb2.CreateVolumeRequest,
                 project_id: str, user_id: str, *, admin: bool) -> Volume:
    """Record the volume CREATING with its operation and quota, then make it on its node."""
    store = runner.store
    wanted = request.volume
    _check_new(wanted, admin=admin)
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    source = wanted.WhichOneof("source")
    node, pool_id, zone = wanted.node, wanted.pool_id, wanted.availability_zone
    snapshot = None
    if source == "source_snapshot_id":
        snapshot = await _source_snapshot(store, project_id, wanted.source_snapshot_id)
        node, pool_id = snapshot.node, snapshot.pool_id
        if wanted.size_gb < snapshot.size_gb:
            raise _too_small(wanted.size_gb, snapshot.size_gb, "snapshot")
    checked = None
    if source == "source_image_id":  # before any placement
        checked = await image.usable(store, project_id, wanted.source_image_id)
    assert runner.clients is not None
    where = await pool.place(store, runner.clients, node=node, zone=zone, pool_id_=pool_id,
                             size_gb=wanted.size_gb, nodes=runner.nodes)
    record = Volume(meta=resources.fresh_meta(wanted.meta, project_id), state=Volume.CREATING,
                    size_gb=wanted.size_gb, bootable=wanted.bootable or source == "source_image_id",
                    availability_zone=where.zone, node=where.node, pool_id=where.pool_id,
                    pool_name=where.pool_name, multiattach=wanted.multiattach, user_id=user_id,
                    format="qcow2")
    record.libvirt_name = libvirt_name(record.meta.id)
    if source == "source_image_id":
        record.source_image_id = wanted.source_image_id
    elif snapshot is not None:
        record.source_snapshot_id = snapshot.meta.id
    op = await runner.new(Kind.CREATE_VOLUME, record.meta.id, project_id, where.node)
    record.task_id = op.id
    amounts = {"volumes": 1, "volume_gb": record.size_gb}
    made, revision = await _commit_create(runner, record, op, idempotency, amounts,
                                          dry_run=request.validate_only, known_image=checked)
    if request.validate_only:
        record.meta.id = ""
        record.task_id = ""
        return record
    if made == record.meta.id:
        runner.start(op)
    return await _as_made(store, record, made, revision)


def _too_small(size_gb: int, needed: int, what: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"size_gb {size_gb} is smaller than the {what} ({needed} GiB)",
        violations=[errors.FieldViolation("volume.size_gb", f"at least {needed} GiB")])


async def _as_made(store: Store, record: Volume, made: str, revision: int) -> Volume:
    """The volume a create answers with: `record` as its commit wrote it at `revision`, or
    (an earlier request's volume, replayed) that volume as it is now."""
    if made != record.meta.id or not revision:
        return await fetch(store, made)
    record.meta.revision = revision
    return record


async def _check_image(store: Store, record: Volume,
                       known: tuple[image_pb2.Image, int] | None) -> tuple[image_pb2.Image, int]:
    """The usable source image and its revision (None, 0 for none): `known` if the caller has
    just read it, else read now; INVALID_ARGUMENT if it is bigger than the volume."""
    if not record.source_image_id:
        return image_pb2.Image(), 0
    found, revision = known or await image.usable(store, record.meta.project_id,
                                                  record.source_image_id)
    needed = max(found.min_disk_gb, _ceil_gb(found.virtual_size_bytes or found.size_bytes))
    if record.size_gb < needed:
        raise _too_small(record.size_gb, needed, "image")
    return found, revision


async def _hold_source(txn: Txn, record: Volume, image_revision: int) -> None:
    """The index key that keeps the volume's image or snapshot from being deleted under it."""
    if record.source_image_id:
        await _check_image_in(txn, record.source_image_id, image_revision)
        image.record_user(txn, record.source_image_id, "volume", record.meta.id)
    if record.source_snapshot_id:
        await _use_snapshot_in(txn, record.source_snapshot_id, record.meta.id)


async def _prefetch(txn: Txn, record: Volume, idempotency: requests.Idempotency | None, *,
                    with_quota: bool, root_of: str) -> None:
    """Read what a create's transaction reads in one round trip instead of one each."""
    project_id = record.meta.project_id
    wanted: list[tuple[str, type[message.Message]]] = [(keys.volume(record.meta.id), Volume)]
    if with_quota:
        wanted += [(quota.quota_key(project_id), identity_pb2.Quota),
                   (quota.DEFAULTS_KEY, identity_pb2.Quota),
                   (quota.usage_key(project_id, "storage"), identity_pb2.Usage)]
    if idempotency is not None:
        wanted.append((idempotency.key, request_pb2.RequestRecord))
    if root_of:
        wanted.append((keys.root_disk(root_of), wrappers_pb2.StringValue))
    await txn.get_many(wanted)


async def _commit_create(runner: operation.Runner, record: Volume,
                         op: operation.Operation, idempotency: requests.Idempotency | None,
                         amounts: dict[str, int], *, dry_run: bool = False,
                         root_of: str = "",
                         known_image: tuple[image_pb2.Image, int] | None = None,
                         reserved: attachment_pb2.VolumeAttachment | None = None,
                         ) -> tuple[str, int]:
    """One transaction: the volume, its operation, quota, the source's index key, request id
    (and `reserved`, the attachment a root disk is made with).

    Returns the volume's id (an earlier request's, replayed) and the revision the
    transaction committed at (0: it wrote nothing). `known_image` is the source
    image as the caller has just judged it usable (its first check then reads nothing).
    """
    store, project_id = runner.store, record.meta.project_id
    last: list[Txn] = []
    for _ in range(8):
        source, image_revision = await _check_image(store, record, known_image)
        known_image = None  # a rerun after the image moved reads it again

        async def body(txn: Txn, source: image_pb2.Image = source,
                       image_revision: int = image_revision) -> str:
            last[:] = [txn]
            if image_revision:  # compared at commit as if read: a change runs the body again
                txn.assume(keys.image(record.source_image_id), source, image_revision)
            await _prefetch(txn, record, idempotency, with_quota=bool(amounts), root_of=root_of)
            earlier = await requests.replayed(txn, idempotency)
            if earlier:
                return earlier
            existing = await _claim_root(txn, root_of, record.meta.id)
            if existing:
                return existing
            if amounts:
                await quota.reserve(txn, project_id, amounts)
            await _hold_source(txn, record, image_revision)
            if dry_run:
                raise _DryRun
            _write_new(txn, record, op, reserved)
            await requests.remember(txn, idempotency, record.meta.id)
            return record.meta.id

        try:
            async with runner.turn(project_id):
                made = await store.atomic(body, deadline=operation.patience())
            return made, last[0].committed_revision if last else 0
        except _ImageMoved:
            continue
        except _DryRun:
            return "", 0
    raise errors.Conflict(f"image {record.source_image_id} kept changing",
                          reason="nubis.image.changing")


def _write_new(txn: Txn, record: Volume, op: operation.Operation,
               reserved: attachment_pb2.VolumeAttachment | None) -> None:
    """A new volume's record, its operation's and the attachment it is made with, if any."""
    txn.create(keys.volume(record.meta.id), record)
    if reserved is not None:
        txn.create(keys.attachment(reserved.meta.id), reserved)
    txn.put(keys.operation(record.meta.id), op)


async def _claim_root(txn: Txn, instance_id: str, volume_id: str) -> str:
    """The instance's root-disk index key names `volume_id` now; or the volume it already named
    (""; also when `instance_id` is "": not a root disk)."""
    if not instance_id:
        return ""
    existing = await txn.get(keys.root_disk(instance_id), wrappers_pb2.StringValue)
    if existing is not None:
        return existing.value.value
    txn.put(keys.root_disk(instance_id), wrappers_pb2.StringValue(value=volume_id))
    return ""


async def create_root_disk(runner: operation.Runner,
                           request: volume_pb2.CreateRootDiskRequest) -> Volume:
    """An instance's root disk from an image on its node; one per instance, however often asked."""
    problems = errors.ViolationCollector()
    for field in ("instance_id", "project_id", "image_id"):
        if not resources.is_uuid(getattr(request, field)):
            problems.add(field, "must be a UUID")
    if not request.node:
        problems.add("node", "required: the node the instance was scheduled to")
    if not 1 <= request.size_gb <= MAX_SIZE_GB:
        problems.add("size_gb", f"1 to {MAX_SIZE_GB} GiB")
    if request.pool_id and not resources.is_uuid(request.pool_id):
        problems.add("pool_id", "must be a UUID")
    if len(request.device_name) > MAX_DEVICE_NAME:
        problems.add("device_name", f"at most {MAX_DEVICE_NAME} characters, e.g. vda")
    problems.check("invalid root disk request")
    store = runner.store
    existing, source = await _root_disk_and_image(store, request.instance_id, request.image_id)
    if existing is not None:
        return await fetch(store, existing.value.value)
    idempotency = requests.prepare(store, request.project_id, ROOT_DISK_METHOD, request,
                                   request.request_id)
    # Before any placement; the commit compares the image at the revision judged here.
    checked = image.usable_as_read(source, request.project_id, request.image_id)
    assert runner.clients is not None
    where = await pool.place(store, runner.clients, node=request.node, zone="",
                             pool_id_=request.pool_id, size_gb=request.size_gb)
    meta = resource_pb2.ResourceMeta(name=f"root-{request.instance_id[:8]}")
    record = Volume(meta=resources.fresh_meta(meta, request.project_id), state=Volume.CREATING,
                    size_gb=request.size_gb, source_image_id=request.image_id, bootable=True,
                    availability_zone=where.zone, node=where.node, pool_id=where.pool_id,
                    pool_name=where.pool_name, root_disk_of_instance_id=request.instance_id,
                    format="qcow2")
    record.libvirt_name = libvirt_name(record.meta.id)
    reserved = _reserved_for(record, request) if request.device_name else None
    op = await runner.new(Kind.CREATE_VOLUME, record.meta.id, request.project_id, where.node,
                          attachment_id=reserved.meta.id if reserved is not None else "")
    record.task_id = op.id
    made, revision = await _commit_create(runner, record, op, idempotency, {},
                                          root_of=request.instance_id, known_image=checked,
                                          reserved=reserved)
    if made == record.meta.id:
        runner.start(op)
    return await _as_made(store, record, made, revision)


def _reserved_for(record: Volume,
                  request: volume_pb2.CreateRootDiskRequest) -> attachment_pb2.VolumeAttachment:
    """The attachment a root disk is made with: RESERVED as `device_name` for its instance
    (the volume names it too); the disk's outcome begins it (ATTACHING, with the
    connection)."""
    meta = resource_pb2.ResourceMeta(name=f"{record.meta.name}-{request.instance_id[:8]}")
    reserved = attachment_pb2.VolumeAttachment(
        meta=resources.fresh_meta(meta, record.meta.project_id),
        state=attachment_pb2.VolumeAttachment.RESERVED, volume_id=record.meta.id,
        instance_id=request.instance_id, node=request.node, device_name=request.device_name)
    record.attachments.add(attachment_id=reserved.meta.id, instance_id=request.instance_id,
                           device_name=request.device_name)
    return reserved


async def _root_disk_and_image(
    store: Store, instance_id: str, image_id: str,
) -> tuple[Versioned[wrappers_pb2.StringValue] | None, Versioned[image_pb2.Image] | None]:
    """The instance's root-disk index key and the image, read in one round trip."""
    async def body(txn: Txn) -> list[Versioned[Any] | None]:
        return await txn.get_many([(keys.root_disk(instance_id), wrappers_pb2.StringValue),
                                   (keys.image(image_id), image_pb2.Image)])

    existing, source = await store.atomic(body)  # reads only: no commit
    return existing, source


async def _drop_root_index(txn: Txn, volume: Volume) -> None:
    """The instance's root-disk index key, if `volume` is a root disk the key still names."""
    if not volume.root_disk_of_instance_id:
        return
    key = keys.root_disk(volume.root_disk_of_instance_id)
    found = await txn.get(key, wrappers_pb2.StringValue)
    if found is not None and found.value.value == volume.meta.id:
        txn.delete(key)


def volume_filter(text: str, *, admin: bool) -> filtering.Filter:
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(_STATES), "bootable": frozenset({"true", "false"}),
        "availability_zone": None, "instance_id": None}
    if admin:
        keys_.update({"node": None, "pool_id": None, "project_id": None})
    return filtering.parse(text, keys_)


def _fields(volume: Volume) -> dict[str, str]:
    return {"name": volume.meta.name, "state": filtering.enum_name(Volume.State.DESCRIPTOR,
                                                                    volume.state),
            "bootable": "true" if volume.bootable else "false",
            "availability_zone": volume.availability_zone, "node": volume.node,
            "pool_id": volume.pool_id, "project_id": volume.meta.project_id}


def matcher(project_id: str | None, wanted: filtering.Filter) -> Callable[[Volume], bool]:
    def keep(volume: Volume) -> bool:
        if project_id is not None and volume.meta.project_id != project_id:
            return False
        fields = _fields(volume)
        instances = {ref.instance_id for ref in volume.attachments} or {""}
        return any(wanted.matches({**fields, "instance_id": instance}, volume.meta.labels)
                   for instance in instances)
    return keep


async def list_volumes(store: Store, project_id: str | None,
                       request: volume_pb2.ListVolumesRequest, *,
                       admin: bool) -> tuple[list[Volume], str]:
    size = pages.page_size(request.page_size)
    keep = matcher(project_id, volume_filter(request.filter, admin=admin))
    pages.cursor(request.page_token, PAGE_LISTING, resources.is_uuid)
    items, _ = await store.list_all(keys.VOLUMES, Volume)
    chosen = []
    for item in items:
        if keep(item.value):
            item.value.meta.revision = item.mod_revision
            chosen.append(item.value)
    return pages.page_of(chosen, lambda volume: volume.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)


_UPDATABLE = ("name", "description", "labels", "bootable")


async def update(store: Store, request: volume_pb2.UpdateVolumeRequest,
                 check_visible: Callable[[Volume], None]) -> Volume:
    paths = resources.check_mask(request.update_mask.paths, _UPDATABLE)
    change = request.volume
    problems = errors.ViolationCollector()
    if "name" in paths:
        resources.check_name(problems, "volume.meta.name", change.meta.name)
    if "labels" in paths:
        resources.check_labels(problems, "volume.meta.labels", dict(change.meta.labels))
    problems.check("invalid volume update")
    resources.check_id(change.meta.id, "volume.meta.id")

    async def body(txn: Txn) -> None:
        found = await txn.get(keys.volume(change.meta.id), Volume)
        if found is None:
            raise not_found(change.meta.id)
        check_visible(found.value)
        if change.meta.revision and found.mod_revision != change.meta.revision:
            raise _revision_mismatch(change.meta.id, change.meta.revision)
        volume = found.value
        for path in paths:
            if path == "labels":
                volume.meta.labels.clear()
                volume.meta.labels.update(change.meta.labels)
            elif path == "bootable":
                volume.bootable = change.bootable
            else:
                setattr(volume.meta, path, getattr(change.meta, path))
        put(txn, volume)

    await store.atomic(body, deadline=operation.patience())
    return await fetch(store, change.meta.id)


def _revision_mismatch(volume_id: str, revision: int) -> errors.Conflict:
    return errors.Conflict(f"volume {volume_id} changed since revision {revision}",
                           reason="nubis.revision_mismatch",
                           metadata={"id": volume_id, "revision": str(revision)})


async def _check_deletable(store: Store, volume: Volume, *, force: bool) -> None:
    if volume.attachments and not force:
        raise errors.FailedPrecondition(
            f"volume {volume.meta.id} is attached to instance "
            f"{volume.attachments[0].instance_id}: detach it first", reason=ATTACHED,
            metadata={"id": volume.meta.id, "instance_id": volume.attachments[0].instance_id})
    if volume.state not in (Volume.AVAILABLE, Volume.ERROR) and not force:
        raise bad_state(volume, "delete it")
    # Never with snapshots, even forced. A snapshot's create writes the volume,
    # so one committed after this read makes the delete's compare fail.
    snapshots = await store.list(keys.volume_snapshots(volume.meta.id),
                                 wrappers_pb2.StringValue, page_size=1)
    if snapshots.items:
        raise errors.FailedPrecondition(
            f"volume {volume.meta.id} has snapshots: delete them first",
            reason=HAS_SNAPSHOTS, metadata={"id": volume.meta.id})


async def delete(runner: operation.Runner, request: volume_pb2.DeleteVolumeRequest,
                 check_visible: Callable[[Volume], None], *, admin: bool) -> Volume:
    """Move the volume to DELETING with its operation; refused while attached or snapshotted."""
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
        found = await txn.get(keys.volume(request.id), Volume)
        if found is None:
            raise not_found(request.id)
        volume = found.value
        check_visible(volume)
        if request.revision and found.mod_revision != request.revision:
            raise _revision_mismatch(request.id, request.revision)
        if volume.state == Volume.DELETING:
            return
        await _check_deletable(store, volume, force=request.force)
        op = await runner.new(Kind.DELETE_VOLUME, volume.meta.id, volume.meta.project_id,
                              volume.node)
        if request.force:
            for ref in volume.attachments:
                txn.delete(keys.attachment(ref.attachment_id))
            del volume.attachments[:]
        volume.state, volume.task_id = Volume.DELETING, op.id
        put(txn, volume)
        txn.put(keys.operation(volume.meta.id), op)
        await _drop_root_index(txn, volume)  # no longer the instance's: it may get a new one
        started.append(op)

    await store.atomic(body, deadline=operation.patience())
    for op in started:
        runner.start(op)
    return await fetch(store, request.id)


async def extend(runner: operation.Runner, request: volume_pb2.ExtendVolumeRequest,
                 check_visible: Callable[[Volume], None]) -> Volume:
    """Grow an AVAILABLE volume: EXTENDING with the extra GiB reserved, then the node resizes."""
    store = runner.store
    resources.check_id(request.id)
    if not 1 <= request.new_size_gb <= MAX_SIZE_GB:
        raise errors.InvalidArgument("new_size_gb out of range", violations=[
            errors.FieldViolation("new_size_gb", f"1 to {MAX_SIZE_GB} GiB")])
    started: list[operation.Operation] = []

    async def body(txn: Txn) -> None:
        started.clear()
        volume = await in_txn(txn, request.id)
        check_visible(volume)
        if request.new_size_gb <= volume.size_gb:
            raise errors.InvalidArgument(
                f"volumes only grow: {request.new_size_gb} GiB is not more than "
                f"{volume.size_gb} GiB", violations=[errors.FieldViolation(
                    "new_size_gb", f"more than the current {volume.size_gb} GiB")])
        if volume.state != Volume.AVAILABLE:
            raise bad_state(volume, "extend it (it must be AVAILABLE: detach it first)")
        if not volume.root_disk_of_instance_id:
            await quota.reserve(txn, volume.meta.project_id,
                                {"volume_gb": request.new_size_gb - volume.size_gb})
        op = await runner.new(Kind.EXTEND_VOLUME, volume.meta.id, volume.meta.project_id,
                              volume.node, new_size_gb=request.new_size_gb)
        volume.state, volume.task_id = Volume.EXTENDING, op.id
        put(txn, volume)
        txn.put(keys.operation(volume.meta.id), op)
        started.append(op)

    project_id = (await fetch(store, request.id)).meta.project_id
    async with runner.turn(project_id):
        await store.atomic(body, deadline=operation.patience())
    for op in started:
        runner.start(op)
    return await fetch(store, request.id)


_RESETTABLE = (Volume.AVAILABLE, Volume.IN_USE, Volume.ERROR)


async def reset_state(store: Store, request: volume_pb2.ResetVolumeStateRequest) -> Volume:
    """Cinder's reset-state: force the recorded state; the node and attachments are untouched.

    An operation in flight is dropped with it (its outcome will find the record gone).
    """
    resources.check_id(request.id)
    if request.state not in _RESETTABLE:
        raise errors.InvalidArgument("state must be AVAILABLE, IN_USE or ERROR", violations=[
            errors.FieldViolation("state", "AVAILABLE, IN_USE or ERROR")])

    async def body(txn: Txn) -> None:
        volume = await in_txn(txn, request.id)
        volume.state, volume.task_id = request.state, ""
        if request.state == Volume.ERROR:
            volume.fault.CopyFrom(operation.fault("nubis.volume.reset", "state reset by an admin"))
        put(txn, volume)
        txn.delete(keys.operation(request.id))

    await store.atomic(body, deadline=operation.patience())
    return await fetch(store, request.id)


async def _volumes_at_start(store: Store,
                            start_revision: int) -> tuple[list[Versioned[Volume]], int]:
    """The volumes a watch starts from, and its revision: now, or as they were at
    `start_revision`, so one deleted since (between a caller's Get and its watch) is known
    and its DELETED is not lost."""
    if start_revision < 0:
        raise errors.InvalidArgument("start_revision must not be negative", violations=[
            errors.FieldViolation("options.start_revision", "must not be negative")])
    if not start_revision:
        return await store.list_all(keys.VOLUMES, Volume)
    now = await store.revision()
    if start_revision > now:
        raise errors.InvalidArgument(
            f"start_revision {start_revision} is ahead of the store (at {now})",
            violations=[errors.FieldViolation("options.start_revision",
                                              "must be a revision a watch event gave")])
    return await store.list_at(keys.VOLUMES, Volume, start_revision), start_revision


async def watch(store: Store, project_id: str | None, request: volume_pb2.WatchVolumesRequest,
                *, admin: bool) -> AsyncIterator[volume_pb2.VolumeEvent]:
    """The volumes' changes from etcd's watch: optional listing, SYNCED, then each change."""
    keep = matcher(project_id, volume_filter(request.filter, admin=admin))
    options = request.options
    items, revision = await _volumes_at_start(store, options.start_revision)
    known = {item.key: item.value for item in items if keep(item.value)}
    Event = volume_pb2.VolumeEvent
    if options.initial_state:
        for item in items:
            if item.key in known:
                item.value.meta.revision = item.mod_revision
                yield Event(type=resource_pb2.EVENT_TYPE_ADDED, volume=item.value,
                            revision=item.mod_revision)
    yield Event(type=resource_pb2.EVENT_TYPE_SYNCED, revision=revision)
    async for event in store.watch(keys.VOLUMES, Volume, start_revision=revision + 1):
        if event.value is None:
            last = known.pop(event.key, None)
            if last is not None:
                last.state = Volume.DELETED
                yield Event(type=resource_pb2.EVENT_TYPE_DELETED, volume=last,
                            revision=event.mod_revision)
            continue
        volume = event.value
        volume.meta.revision = event.mod_revision
        if not keep(volume):
            if known.pop(event.key, None) is not None:
                yield Event(type=resource_pb2.EVENT_TYPE_DELETED, volume=volume,
                            revision=event.mod_revision)
            continue
        kind = resource_pb2.EVENT_TYPE_MODIFIED if event.key in known \
            else resource_pb2.EVENT_TYPE_ADDED
        known[event.key] = volume
        yield Event(type=kind, volume=volume, revision=event.mod_revision)
