"""Volume attachments: the bookkeeping compute drives while a node plugs a volume in or out.

Attach: ReserveVolume (volume AVAILABLE → RESERVED) → BeginAttach (→ ATTACHING,
with the connection the node needs) → CompleteAttach (→ IN_USE). Detach:
BeginDetach (→ DETACHING) → CompleteDetach (the attachment goes; the volume is
AVAILABLE again, or stays IN_USE while other attachments remain). Every step
is one transaction over the attachment and its volume, comparing the
volume's revision: of two racing reservations of one volume exactly one
commits, and the other, run again on the fresh record, is refused. Volumes
live in one node's pool, so an instance on another node cannot attach them.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import Message
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import attachment_pb2

from services.common import errors, filtering, pages, requests, resources
from services.common.store import Store, Txn
from services.storage import keys, operation, volume

Attachment = attachment_pb2.VolumeAttachment
Volume = volume.Volume
PAGE_LISTING = "volume-attachments"
OTHER_NODE = "nubis.volume.other_node"
NOT_AVAILABLE = "nubis.volume.not_available"
_STATES = filtering.enum_names(Attachment.State.DESCRIPTOR)
# The volume's state while its attachments are at most at this stage.
_VOLUME_STATE = {Attachment.RESERVED: Volume.RESERVED, Attachment.ATTACHING: Volume.ATTACHING,
                 Attachment.ATTACHED: Volume.IN_USE, Attachment.DETACHING: Volume.DETACHING}

# The volume states attachments decide.
_ATTACHABLE = frozenset({Volume.AVAILABLE, *_VOLUME_STATE.values()})

# The volume of every attachment this replica made or stepped. An attachment never moves
# to another volume, so a step reads the volume with the attachment in one round trip
# (a step reads the attachment's own volume_id all the same). Emptied when full.
_VOLUMES: dict[str, str] = {}
_VOLUMES_MAX = 100_000


def _remember_volume(attachment: Attachment) -> None:
    if len(_VOLUMES) >= _VOLUMES_MAX:
        _VOLUMES.clear()
    _VOLUMES[attachment.meta.id] = attachment.volume_id


async def _read_attachment(txn: Txn, attachment_id: str) -> Attachment:
    """The attachment as `txn` reads it, with its volume (if known) in the same round trip."""
    wanted: list[tuple[str, type[Message]]] = [(keys.attachment(attachment_id), Attachment)]
    volume_id = _VOLUMES.get(attachment_id)
    if volume_id:
        wanted.append((keys.volume(volume_id), Volume))
    found, *_ = await txn.get_many(wanted)
    if found is None:
        raise not_found(attachment_id)
    attachment: Attachment = found.value
    attachment.meta.revision = found.mod_revision
    _remember_volume(attachment)
    return attachment


def not_found(attachment_id: str) -> errors.NotFound:
    return errors.NotFound(f"volume attachment {attachment_id} not found",
                           metadata={"id": attachment_id})


async def fetch(store: Store, attachment_id: str) -> Attachment:
    resources.check_id(attachment_id, "id")
    found = await store.find(keys.attachment(attachment_id), Attachment)
    if found is None:
        raise not_found(attachment_id)
    found.value.meta.revision = found.mod_revision
    return found.value


def _volume_state(attachments: list[Attachment]) -> int:
    """IN_USE once any is attached; else the state of the furthest transition in progress."""
    states = {attachment.state for attachment in attachments}
    for state in (Attachment.ATTACHED, Attachment.DETACHING, Attachment.ATTACHING,
                  Attachment.RESERVED):
        if state in states:
            return _VOLUME_STATE[state]
    return Volume.AVAILABLE


async def reserve(store: Store, request: attachment_pb2.ReserveVolumeRequest,
                  check_visible: Callable[[Volume], None]) -> Attachment:
    """Claim the volume for an instance on `node`; a repeat for the same instance gets the claim."""
    problems = errors.ViolationCollector()
    for field in ("volume_id", "instance_id"):
        if not resources.is_uuid(getattr(request, field)):
            problems.add(field, "must be a UUID")
    if not request.node:
        problems.add("node", "required: the node the instance runs on")
    problems.check("invalid reservation")
    if request.request_id:
        requests.check_request_id(request.request_id)
    made: list[Attachment] = []
    last: list[Txn] = []

    async def body(txn: Txn) -> str:
        made.clear()
        last[:] = [txn]
        found = await volume.in_txn(txn, request.volume_id)
        check_visible(found)
        for ref in found.attachments:
            if ref.instance_id == request.instance_id:
                return ref.attachment_id  # a retry of this reservation
        _check_reservable(found, request)
        meta = resource_pb2.ResourceMeta(name=f"{found.meta.name}-{request.instance_id[:8]}")
        attachment = Attachment(meta=resources.fresh_meta(meta, found.meta.project_id),
                                state=Attachment.RESERVED, volume_id=found.meta.id,
                                instance_id=request.instance_id, node=request.node,
                                read_only=request.read_only)
        txn.create(keys.attachment(attachment.meta.id), attachment)
        found.attachments.add(attachment_id=attachment.meta.id, instance_id=request.instance_id)
        if found.state == Volume.AVAILABLE:
            found.state = Volume.RESERVED
        volume.put(txn, found)
        made.append(attachment)
        return attachment.meta.id

    attachment_id = await store.atomic(body, deadline=operation.patience())
    if made and last[0].committed_revision:  # answer with what the commit wrote
        made[0].meta.revision = last[0].committed_revision
        _remember_volume(made[0])
        return made[0]
    return await fetch(store, attachment_id)  # a retry: the reservation as it is now


def _check_reservable(found: Volume, request: attachment_pb2.ReserveVolumeRequest) -> None:
    if found.node != request.node:
        raise errors.FailedPrecondition(
            f"volume {found.meta.id} lives in a pool of node {found.node} and instance "
            f"{request.instance_id} runs on node {request.node}: volumes attach only to "
            "instances on their own node", reason=OTHER_NODE,
            metadata={"volume_node": found.node, "instance_node": request.node})
    shareable = found.multiattach and found.state == Volume.IN_USE
    if found.state != Volume.AVAILABLE and not shareable:
        raise errors.FailedPrecondition(
            f"volume {found.meta.id} is {Volume.State.Name(found.state)}"
            + (f" (attached to instance {found.attachments[0].instance_id})"
               if found.attachments else "") + ": it cannot be reserved",
            reason=NOT_AVAILABLE, metadata={"id": found.meta.id,
                                            "state": Volume.State.Name(found.state)})


async def _step(store: Store, attachment_id: str, allowed: tuple[int, ...], target: int,
                doing: str, check_visible: Callable[[Volume], None],
                change: Callable[[Attachment, Volume], None] | None = None) -> Attachment:
    """Move one attachment from `allowed` to `target`, its volume with it (a repeat: no-op)."""
    resources.check_id(attachment_id, "attachment_id")
    last: list[Txn] = []

    async def body(txn: Txn) -> Attachment:
        last[:] = [txn]
        attachment = await _read_attachment(txn, attachment_id)
        owner = await volume.in_txn(txn, attachment.volume_id)
        check_visible(owner)
        if attachment.state == target:
            return attachment  # meta.revision: as read
        if attachment.state not in allowed:
            raise errors.FailedPrecondition(
                f"attachment {attachment_id} is {Attachment.State.Name(attachment.state)}: "
                f"cannot {doing}", reason="nubis.attachment.state",
                metadata={"id": attachment_id, "state": Attachment.State.Name(attachment.state)})
        attachment.state = target  # type: ignore[assignment]
        if change is not None:
            change(attachment, owner)
        attachment.meta.update_time.CopyFrom(resources.now())
        attachment.meta.revision = 0
        txn.put(keys.attachment(attachment_id), attachment)
        await _restate(txn, owner, attachment)
        return attachment

    # The answer is the attachment as this step read (a repeat) or wrote it: no read after.
    done = await store.atomic(body, deadline=operation.patience())
    if last[0].committed_revision:
        done.meta.revision = last[0].committed_revision
    elif not done.meta.revision:  # an earlier, ambiguous try landed it: read what it wrote
        return await fetch(store, attachment_id)
    return done


async def _restate(txn: Txn, owner: Volume, changed: Attachment | None) -> None:
    """The volume's state from all its attachments (`changed` as just written); a volume
    that an operation holds (CREATING, DELETING, EXTENDING) or in ERROR keeps its state."""
    if owner.state not in _ATTACHABLE:
        volume.put(txn, owner)
        return
    others = []
    for ref in owner.attachments:
        if changed is not None and ref.attachment_id == changed.meta.id:
            others.append(changed)
            continue
        found = await txn.get(keys.attachment(ref.attachment_id), Attachment)
        if found is not None:
            others.append(found.value)
    owner.state = _volume_state(others)  # type: ignore[assignment]
    volume.put(txn, owner)


async def begin_attach(store: Store, request: attachment_pb2.BeginAttachRequest,
                       check_visible: Callable[[Volume], None]) -> Attachment:
    if not request.device_name or len(request.device_name) > volume.MAX_DEVICE_NAME:
        raise errors.InvalidArgument("device_name is required (e.g. vdb)", violations=[
            errors.FieldViolation("device_name",
                                  f"1-{volume.MAX_DEVICE_NAME} characters, e.g. vdb")])

    def connect(attachment: Attachment, owner: Volume) -> None:
        if owner.state == Volume.CREATING:  # a root disk reserved as it is made: no path yet
            raise errors.FailedPrecondition(
                f"volume {owner.meta.id} is still being made: its attachment begins once it is",
                reason=NOT_AVAILABLE, metadata={"id": owner.meta.id, "state": "CREATING"})
        _connect(attachment, owner, request.device_name)

    return await _step(store, request.attachment_id, (Attachment.RESERVED,),
                       Attachment.ATTACHING, "begin attaching it", check_visible, connect)


def _connect(attachment: Attachment, owner: Volume, device_name: str) -> None:
    """`attachment` of `owner` as `device_name`, with the connection the node plugs."""
    attachment.device_name = device_name
    attachment.connection.CopyFrom(attachment_pb2.DiskConnection(
        node=owner.node, pool_name=owner.pool_name, volume_name=owner.libvirt_name,
        path=owner.path, format=owner.format or "qcow2"))
    for ref in owner.attachments:
        if ref.attachment_id == attachment.meta.id:
            ref.device_name = device_name


async def begin_made(txn: Txn, owner: Volume, attachment_id: str) -> None:
    """A volume just made (`owner`, its path set) begins the attachment it was reserved
    with, if that is still RESERVED: ATTACHING with the connection, the volume with it."""
    found = await txn.get(keys.attachment(attachment_id), Attachment)
    if found is None or found.value.state != Attachment.RESERVED:
        return  # detached meanwhile (a failed build), or begun already
    begun = found.value
    begun.state = Attachment.ATTACHING
    _connect(begun, owner, begun.device_name)
    begun.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.attachment(attachment_id), begun)
    owner.state = Volume.AVAILABLE  # what it is made as; the attachments decide the rest
    await _restate(txn, owner, begun)


async def complete_attach(store: Store, request: attachment_pb2.CompleteAttachRequest,
                          check_visible: Callable[[Volume], None]) -> Attachment:
    return await _step(store, request.attachment_id, (Attachment.ATTACHING,),
                       Attachment.ATTACHED, "complete attaching it", check_visible)


async def begin_detach(store: Store, request: attachment_pb2.BeginDetachRequest,
                       check_visible: Callable[[Volume], None]) -> Attachment:
    return await _step(store, request.attachment_id, (Attachment.ATTACHED,),
                       Attachment.DETACHING, "begin detaching it", check_visible)


async def complete_detach(store: Store, request: attachment_pb2.CompleteDetachRequest,
                          check_visible: Callable[[Volume], None]) -> Volume:
    """Drop the attachment from any state (a detach done, or an attach rolled back)."""
    resources.check_id(request.attachment_id, "attachment_id")
    volume_id: list[str] = []

    async def body(txn: Txn) -> None:
        volume_id.clear()
        found = await _read_attachment(txn, request.attachment_id)
        owner = await volume.in_txn(txn, found.volume_id)
        check_visible(owner)
        kept = [ref for ref in owner.attachments if ref.attachment_id != request.attachment_id]
        del owner.attachments[:]
        owner.attachments.extend(kept)
        txn.delete(keys.attachment(request.attachment_id))
        await _restate(txn, owner, None)
        volume_id.append(owner.meta.id)

    await store.atomic(body, deadline=operation.patience())
    return await volume.fetch(store, volume_id[0])


def attachment_filter(text: str) -> filtering.Filter:
    return filtering.parse(text, {"volume_id": None, "instance_id": None, "node": None,
                                  "state": frozenset(_STATES)}, labels=False)


async def list_attachments(store: Store, project_id: str | None,
                           request: attachment_pb2.ListVolumeAttachmentsRequest,
                           ) -> tuple[list[Attachment], str]:
    size = pages.page_size(request.page_size)
    wanted = attachment_filter(request.filter)
    pages.cursor(request.page_token, PAGE_LISTING, resources.is_uuid)
    items, _ = await store.list_all(keys.ATTACHMENTS, Attachment)
    chosen = []
    for item in items:
        found = item.value
        if project_id is not None and found.meta.project_id != project_id:
            continue
        fields = {"volume_id": found.volume_id, "instance_id": found.instance_id,
                  "node": found.node,
                  "state": filtering.enum_name(Attachment.State.DESCRIPTOR, found.state)}
        if wanted.matches(fields):
            found.meta.revision = item.mod_revision
            chosen.append(found)
    return pages.page_of(chosen, lambda found: found.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)
