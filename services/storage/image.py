"""Images (Glance): records, visibility, members, kernel-boot parts, delete, and `usable`.

An image is created QUEUED, filled by one upload (``image_upload``) to ACTIVE,
and never changes its bytes after that. Visibility: PRIVATE (the owning
project), SHARED (also its member projects), PUBLIC (everyone; only
cloud-admins publish). Other nubis services (the `service` role) and
cloud-admins see every image.

What uses an image's bytes holds a key under ``storage/image-users/<image>/``
(`record_user`): volumes made from it, written by the volume's own create
transaction against the revision `usable` returned; images naming it as their
kernel or ramdisk, written here. `delete` first marks the image DELETED with a
compare on its revision, which bumps it, so a racing user's create fails its
compare and reads the image again; then it lists the users: any left, and the
image is ACTIVE again and the delete FAILED_PRECONDITION `nubis.image.in_use`.
A replica that dies between the mark and the end leaves a DELETED mark that
`recover` (run periodically) finishes the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import structlog
from google.protobuf import empty_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2

from services.common import errors, filtering, pages, policy, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.storage import image_store, keys

Image = image_pb2.Image
State = Image.State
Format = Image.DiskFormat
Visibility = Image.Visibility

log = structlog.get_logger(__name__)

PAGE_LISTING = "images"
CREATE_METHOD = resources.method(storage_service_pb2.DESCRIPTOR, "StorageService", "CreateImage")
DISK_FORMATS = frozenset({Format.DISK_FORMAT_QCOW2, Format.DISK_FORMAT_RAW})
BOOT_PARTS = {"kernel_image_id": Format.DISK_FORMAT_KERNEL,
              "ramdisk_image_id": Format.DISK_FORMAT_RAMDISK}
MUTABLE = ("name", "description", "labels", "min_disk_gb", "min_ram_mb", "visibility",
           "protected", "properties", "kernel_image_id", "ramdisk_image_id", "kernel_cmdline")
MAX_MEMBERS = 128
MAX_PROPERTIES = 128
MAX_CMDLINE = 1024
USER_VOLUME = "volume"
USER_IMAGE = "image"
# A DELETED mark older than this belongs to a delete whose replica died: finish it.
STALE_MARK_SECONDS = 60.0

IN_USE = "nubis.image.in_use"
PROTECTED = "nubis.image.protected"
NOT_ACTIVE = "nubis.image.not_active"
NOT_A_DISK = "nubis.image.not_a_disk"
NOT_OWNER = "nubis.image.not_owner"
DELETING = "nubis.image.deleting"

_PROPERTY_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}$")
_PROPERTY_PREFIX = "property."


# --- reading and visibility -------------------------------------------------------------

def sees_all(caller: Principal | None) -> bool:
    """Cloud-admins and other nubis services see every image (None: no authentication)."""
    return caller is None or policy.is_cloud_admin(caller) or policy.is_service(caller)


def visible_to(image: image_pb2.Image, project_id: str) -> bool:
    """Whether `project_id` may see (and use) `image`."""
    if image.meta.project_id == project_id or image.visibility == Visibility.VISIBILITY_PUBLIC:
        return True
    return (image.visibility == Visibility.VISIBILITY_SHARED
            and project_id in image.member_project_ids)


def _visible(caller: Principal | None, image: image_pb2.Image) -> bool:
    return sees_all(caller) or (caller is not None and visible_to(image, caller.project_id))


def _not_found(image_id: str) -> errors.NotFound:
    return errors.NotFound(f"image {image_id} not found", metadata={"image_id": image_id})


def _with_revision(found: Versioned[image_pb2.Image]) -> image_pb2.Image:
    image = found.value
    image.meta.revision = found.mod_revision
    return image


async def fetch(store: Store, image_id: str, field: str = "id") -> image_pb2.Image:
    """The image record (meta.revision set), whoever asks; NotFound if absent."""
    resources.check_id(image_id, field)
    found = await store.find(keys.image(image_id), image_pb2.Image)
    if found is None:
        raise _not_found(image_id)
    return _with_revision(found)


async def get(store: Store, caller: Principal | None, image_id: str,
              field: str = "id") -> image_pb2.Image:
    """The image if `caller` may see it; NotFound otherwise (existence never leaks)."""
    image = await fetch(store, image_id, field)
    if not _visible(caller, image):
        raise _not_found(image_id)
    return image


def require_owner(caller: Principal | None, image: image_pb2.Image) -> None:
    """Changing an image is for its project (or a cloud-admin); others may only look."""
    if caller is None or policy.is_cloud_admin(caller):
        return
    if caller.project_id != image.meta.project_id:
        raise errors.PermissionDenied(
            f"image {image.meta.id} belongs to another project; it can be used, not changed",
            reason=NOT_OWNER, metadata={"image_id": image.meta.id})


def check_usable(image: image_pb2.Image, project_id: str) -> None:
    """An image a volume can be made from in `project_id`: visible, ACTIVE, a disk."""
    if not visible_to(image, project_id):
        raise _not_found(image.meta.id)
    if image.state != State.ACTIVE:
        raise errors.FailedPrecondition(
            f"image {image.meta.id} is {State.Name(image.state)}, not ACTIVE",
            reason=NOT_ACTIVE, metadata={"image_id": image.meta.id,
                                         "state": State.Name(image.state)})
    if image.disk_format not in DISK_FORMATS:
        shown = filtering.enum_name(Format.DESCRIPTOR, image.disk_format)
        raise errors.FailedPrecondition(
            f"image {image.meta.id} is a {shown} for direct kernel boot, not a disk",
            reason=NOT_A_DISK,
            metadata={"image_id": image.meta.id})


async def usable(store: Store, project_id: str, image_id: str) -> tuple[image_pb2.Image, int]:
    """The image a volume of `project_id` is made from, and its mod_revision.

    The volume's create transaction writes `record_user(txn, image_id, "volume",
    volume_id)` and compares the image at this revision (read it with `txn.get`
    and compare `mod_revision`), so a delete that marked the image meanwhile
    makes that create run again and refuse.
    """
    resources.check_id(image_id, "image_id")
    return usable_as_read(await store.find(keys.image(image_id), image_pb2.Image), project_id,
                          image_id)


def usable_as_read(found: Versioned[image_pb2.Image] | None, project_id: str,
                   image_id: str) -> tuple[image_pb2.Image, int]:
    """`usable` on a record the caller read itself (None: absent), e.g. with other keys."""
    if found is None:
        raise _not_found(image_id)
    image = _with_revision(found)
    check_usable(image, project_id)
    return image, image.meta.revision


def record_user(txn: Txn, image_id: str, kind: str, user_id: str) -> None:
    """Inside the user's create transaction: `user_id` uses the image's bytes from now on."""
    txn.put(keys.image_user(image_id, user_id),
            image_pb2.ImageUser(image_id=image_id, kind=kind, user_id=user_id))


def drop_user(txn: Txn, image_id: str, user_id: str) -> None:
    """Inside the user's delete transaction: `user_id` no longer holds the image."""
    txn.delete(keys.image_user(image_id, user_id))


async def users(store: Store, image_id: str) -> list[str]:
    """Ids of whatever holds the image now (any record type under its users' prefix)."""
    items, _ = await store.list_all(keys.image_users(image_id), empty_pb2.Empty)
    return [resources.name_of(item.key, keys.image_users(image_id)) for item in items]


# --- create and update ------------------------------------------------------------------

def _check_text(found: errors.ViolationCollector, field: str, value: str, limit: int) -> None:
    if len(value) > limit or any(ord(ch) < 0x20 or ch == "\x7f" for ch in value):
        found.add(field, f"at most {limit} characters, no control characters")


def _check_fields(found: errors.ViolationCollector, image: image_pb2.Image,
                  paths: Iterable[str]) -> None:
    """Check the caller-settable fields named by `paths` (prefix: `image.`)."""
    chosen = set(paths)
    _check_meta(found, image, chosen)
    for field in ("min_disk_gb", "min_ram_mb"):
        if field in chosen and not 0 <= getattr(image, field) <= 1 << 30:
            found.add(f"image.{field}", "must be 0 or more (and sane)")
    if "visibility" in chosen and image.visibility not in Visibility.values():
        found.add("image.visibility", "one of PRIVATE, PUBLIC, SHARED")
    if "properties" in chosen:
        _check_properties(found, dict(image.properties))
    if "kernel_cmdline" in chosen:
        _check_text(found, "image.kernel_cmdline", image.kernel_cmdline, MAX_CMDLINE)
    for field in BOOT_PARTS:
        value = getattr(image, field)
        if field in chosen and value and not resources.is_uuid(value):
            found.add(f"image.{field}", "must be an image id (UUID) or empty")


def _check_meta(found: errors.ViolationCollector, image: image_pb2.Image,
                chosen: set[str]) -> None:
    if "name" in chosen and not image.meta.name:
        found.add("image.meta.name", "a name of 1-255 characters is required")
    if "name" in chosen:
        _check_text(found, "image.meta.name", image.meta.name, 255)
    if "description" in chosen:
        _check_text(found, "image.meta.description", image.meta.description, 1024)
    if "labels" in chosen:
        resources.check_labels(found, "image.meta.labels", dict(image.meta.labels))


def _check_properties(found: errors.ViolationCollector, properties: dict[str, str]) -> None:
    if len(properties) > MAX_PROPERTIES:
        found.add("image.properties", f"at most {MAX_PROPERTIES} properties")
    for key, value in properties.items():
        if not _PROPERTY_KEY.fullmatch(key):
            found.add(f"image.properties.{key[:64]}", "keys are 1-255 of [A-Za-z0-9_.:-]")
        else:
            _check_text(found, f"image.properties.{key}", value, 4096)


def _check_boot_shape(found: errors.ViolationCollector, image: image_pb2.Image) -> None:
    """Kernel boot: a ramdisk or command line needs a kernel; boot parts name none."""
    if image.disk_format in BOOT_PARTS.values():
        for field in (*BOOT_PARTS, "kernel_cmdline"):
            if getattr(image, field):
                found.add(f"image.{field}", "a kernel or ramdisk image names no boot parts")
    elif not image.kernel_image_id:
        for field in ("ramdisk_image_id", "kernel_cmdline"):
            if getattr(image, field):
                found.add(f"image.{field}", "needs kernel_image_id")


def _check_publish(caller: Principal | None, visibility: int) -> None:
    if visibility == Visibility.VISIBILITY_PUBLIC and not (
            caller is None or policy.is_cloud_admin(caller)):
        raise errors.PermissionDenied(
            "only a cloud-admin makes an image PUBLIC (SHARED shares it with projects)",
            reason="nubis.policy.denied", metadata={"required_role": "cloud-admin"})


def _new_image(request: image_pb2.Image, project_id: str) -> image_pb2.Image:
    image = image_pb2.Image(
        meta=resources.fresh_meta(request.meta, project_id), state=State.QUEUED,
        disk_format=request.disk_format, container_format=Image.CONTAINER_FORMAT_BARE,
        min_disk_gb=request.min_disk_gb, min_ram_mb=request.min_ram_mb,
        visibility=request.visibility or Visibility.VISIBILITY_PRIVATE,
        protected=request.protected, properties=dict(request.properties),
        kernel_image_id=request.kernel_image_id, ramdisk_image_id=request.ramdisk_image_id,
        kernel_cmdline=request.kernel_cmdline)
    return image


def _validate_new(image: image_pb2.Image) -> None:
    found = errors.ViolationCollector()
    _check_fields(found, image, MUTABLE)
    if image.disk_format not in (*DISK_FORMATS, *BOOT_PARTS.values()):
        found.add("image.disk_format", "one of QCOW2, RAW, KERNEL, RAMDISK")
    if image.container_format not in (Image.CONTAINER_FORMAT_UNSPECIFIED,
                                      Image.CONTAINER_FORMAT_BARE):
        found.add("image.container_format", "BARE (or unset)")
    _check_boot_shape(found, image)
    found.check("invalid image")


async def _link_boot_parts(txn: Txn, image: image_pb2.Image,
                           before: image_pb2.Image | None = None, *, hold: bool = True) -> None:
    """Check the kernel/ramdisk `image` names and (`hold`) hold them as their user in `txn`."""
    for field, wanted in BOOT_PARTS.items():
        part_id, old_id = getattr(image, field), getattr(before, field) if before else ""
        if hold and old_id and old_id != part_id:
            drop_user(txn, old_id, image.meta.id)
        if not part_id:
            continue
        found = await txn.get(keys.image(part_id), image_pb2.Image)
        part = found.value if found is not None else None
        if part is None or not visible_to(part, image.meta.project_id):
            raise errors.InvalidArgument(
                f"{field} {part_id} names no image this project can see",
                violations=[errors.FieldViolation(f"image.{field}", "no such image")])
        if part.state != State.ACTIVE or part.disk_format != wanted:
            shown = filtering.enum_name(Format.DESCRIPTOR, wanted)
            raise errors.InvalidArgument(
                f"{field} {part_id} must be an ACTIVE {shown} image",
                violations=[errors.FieldViolation(f"image.{field}", f"an ACTIVE {shown} image")])
        if hold:
            record_user(txn, part_id, USER_IMAGE, image.meta.id)


async def create(store: Store, caller: Principal | None,
                 request: image_pb2.CreateImageRequest, project_id: str) -> image_pb2.Image:
    """A QUEUED image in `project_id`; with a request_id, a retry returns the first one."""
    _validate_new(request.image)
    image = _new_image(request.image, project_id)
    _check_publish(caller, image.visibility)
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        await _link_boot_parts(txn, image, hold=not request.validate_only)
        if not request.validate_only:
            txn.create(keys.image(image.meta.id), image)
            await requests.remember(txn, idempotency, image.meta.id)
        return image.meta.id

    made = await store.atomic(body)
    if request.validate_only:
        image.meta.id = ""
        return image
    return await fetch(store, made)


async def update(store: Store, caller: Principal | None,
                 request: image_pb2.UpdateImageRequest) -> image_pb2.Image:
    """Change the masked fields; a non-zero meta.revision must still be the image's."""
    sent = request.image
    image_id = resources.check_id(sent.meta.id, "image.meta.id")
    chosen = resources.check_mask(request.update_mask.paths, MUTABLE)
    found = errors.ViolationCollector()
    _check_fields(found, sent, chosen)
    found.check("invalid image")
    if "visibility" in chosen:
        _check_publish(caller, sent.visibility or Visibility.VISIBILITY_PRIVATE)
    if sent.meta.revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation("image.meta.revision", "must not be negative")])

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        if current is None or not _visible(caller, current.value):
            raise _not_found(image_id)
        before = current.value
        require_owner(caller, before)
        if sent.meta.revision and sent.meta.revision != current.mod_revision:
            raise errors.Conflict(f"image {image_id} changed since revision {sent.meta.revision}",
                                  metadata={"image_id": image_id})
        if before.state == State.DELETED:
            raise _being_deleted(image_id)
        changed = image_pb2.Image()
        changed.CopyFrom(before)
        _apply(changed, sent, chosen)
        shape = errors.ViolationCollector()
        _check_boot_shape(shape, changed)
        shape.check("invalid image")
        if set(chosen) & set(BOOT_PARTS):
            await _link_boot_parts(txn, changed, before)
        changed.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.image(image_id), changed)

    await store.atomic(body)
    return await fetch(store, image_id)


def _apply(image: image_pb2.Image, sent: image_pb2.Image, chosen: Iterable[str]) -> None:
    for path in chosen:
        if path in ("name", "description"):
            setattr(image.meta, path, getattr(sent.meta, path))
        elif path == "labels":
            image.meta.labels.clear()
            image.meta.labels.update(sent.meta.labels)
        elif path == "properties":
            image.properties.clear()
            image.properties.update(sent.properties)
        elif path == "visibility":
            image.visibility = sent.visibility or Visibility.VISIBILITY_PRIVATE
        else:
            setattr(image, path, getattr(sent, path))


def _being_deleted(image_id: str) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(f"image {image_id} is being deleted", reason=DELETING,
                                     metadata={"image_id": image_id})


# --- members ----------------------------------------------------------------------------

async def change_member(store: Store, caller: Principal | None,
                        request: image_pb2.ImageMemberRequest, *, add: bool) -> image_pb2.Image:
    """Share a SHARED image with one more project, or stop sharing it with one."""
    image_id = resources.check_id(request.image_id, "image_id")
    member = resources.check_id(request.project_id, "project_id")

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        if current is None or not _visible(caller, current.value):
            raise _not_found(image_id)
        image = current.value
        require_owner(caller, image)
        members = list(image.member_project_ids)
        if add:
            _check_new_member(image, member, members)
            if member in members:
                return
            members.append(member)
        elif member not in members:
            raise errors.NotFound(f"project {member} is not a member of image {image_id}",
                                  metadata={"image_id": image_id, "project_id": member})
        else:
            members.remove(member)
        del image.member_project_ids[:]
        image.member_project_ids.extend(sorted(members))
        image.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.image(image_id), image)

    await store.atomic(body)
    return await fetch(store, image_id)


def _check_new_member(image: image_pb2.Image, member: str, members: list[str]) -> None:
    if image.visibility != Visibility.VISIBILITY_SHARED:
        raise errors.FailedPrecondition(
            f"image {image.meta.id} is not SHARED: set its visibility to SHARED first",
            reason="nubis.image.not_shared", metadata={"image_id": image.meta.id})
    if member == image.meta.project_id:
        raise errors.InvalidArgument("the owning project is no member of its own image",
                                     violations=[errors.FieldViolation(
                                         "project_id", "the image's own project")])
    if member not in members and len(members) >= MAX_MEMBERS:
        raise errors.ResourceExhausted(f"an image has at most {MAX_MEMBERS} members",
                                       reason="nubis.image.too_many_members",
                                       metadata={"image_id": image.meta.id})


# --- list -------------------------------------------------------------------------------

def image_filter(text: str, *, admin: bool) -> tuple[filtering.Filter, dict[str, frozenset[str]]]:
    """The filter of ListImages, and its ``property.<key>`` terms apart."""
    names: dict[str, frozenset[str] | None] = {
        "name": None, "state": frozenset(filtering.enum_names(State.DESCRIPTOR)),
        "disk_format": frozenset(filtering.enum_names(Format.DESCRIPTOR)),
        "visibility": frozenset(filtering.enum_names(Visibility.DESCRIPTOR))}
    if admin:
        names["project_id"] = None
    if len(text) > filtering.MAX_LENGTH:
        filtering.parse(text, names)  # refuses it, as every List does
    properties: dict[str, frozenset[str]] = {}
    rest = []
    for word in text.split():
        key, sep, raw = word.partition("=")
        if key.startswith(_PROPERTY_PREFIX):
            name = key[len(_PROPERTY_PREFIX):]
            values = raw.split(",")
            if not sep or not _PROPERTY_KEY.fullmatch(name) or not all(values):
                raise errors.InvalidArgument(
                    f"invalid filter: {word[:80]!r} is not property.<key>=value",
                    violations=[errors.FieldViolation("filter", "bad property term")],
                    reason="nubis.filter.invalid")
            chosen = properties.get(name)
            properties[name] = frozenset(values) if chosen is None else chosen & set(values)
        else:
            rest.append(word)
    return filtering.parse(" ".join(rest), names), properties


def _fields(image: image_pb2.Image) -> dict[str, str]:
    return {"name": image.meta.name, "project_id": image.meta.project_id,
            "state": filtering.enum_name(State.DESCRIPTOR, image.state),
            "disk_format": filtering.enum_name(Format.DESCRIPTOR, image.disk_format),
            "visibility": filtering.enum_name(Visibility.DESCRIPTOR, image.visibility)}


async def list_images(store: Store, caller: Principal | None,
                      request: image_pb2.ListImagesRequest) -> tuple[list[image_pb2.Image], str]:
    """Images the caller may see (all projects' only for a cloud-admin asking), by id."""
    size = pages.page_size(request.page_size)
    every = caller is None or policy.list_scope(
        caller, all_projects=request.all_projects) is None
    wanted, properties = image_filter(request.filter, admin=sees_all(caller))
    items, _ = await store.list_all(keys.IMAGES, image_pb2.Image)
    shown = []
    for item in items:
        image = item.value
        if not every and (caller is None or not visible_to(image, caller.project_id)):
            continue
        if not wanted.matches(_fields(image), image.meta.labels):
            continue
        if any(image.properties.get(key) not in values for key, values in properties.items()):
            continue
        shown.append(_with_revision(item))
    return pages.page_of(shown, lambda image: image.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)


# --- delete -----------------------------------------------------------------------------

async def delete(store: Store, bytes_store: image_store.ImageStore, caller: Principal | None,
                 image_id: str, revision: int = 0) -> None:
    """Delete the record and its bytes, unless protected or still used (see the module doc)."""
    resources.check_id(image_id)
    if revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation("revision", "must not be negative")])

    async def mark(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        if current is None or not _visible(caller, current.value):
            raise _not_found(image_id)
        image = current.value
        require_owner(caller, image)
        if revision and revision != current.mod_revision:
            raise errors.Conflict(f"image {image_id} changed since revision {revision}",
                                  metadata={"image_id": image_id})
        if image.protected:
            raise errors.FailedPrecondition(
                f"image {image_id} is protected: clear `protected` to delete it",
                reason=PROTECTED, metadata={"image_id": image_id})
        if image.state == State.DELETED:
            raise _being_deleted(image_id)
        # The write bumps the revision: a user's create comparing the one it read fails.
        image.state = State.DELETED
        image.meta.update_time.CopyFrom(resources.now())
        txn.put(keys.image(image_id), image)

    await store.atomic(mark)
    # Nothing writes a DELETED image but its delete: the mark's revision is this one.
    marked = await store.find(keys.image(image_id), image_pb2.Image)
    if marked is not None and marked.value.state == State.DELETED:
        await finish_delete(store, bytes_store, image_id, marked.mod_revision)


async def finish_delete(store: Store, bytes_store: image_store.ImageStore, image_id: str,
                        mark: int) -> None:
    """After the mark: refuse (and restore) if anything holds the image, else remove it all."""
    holders = await users(store, image_id)

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.image(image_id), image_pb2.Image)
        if current is None:
            return
        if current.mod_revision != mark:
            raise errors.Conflict(f"image {image_id} changed while being deleted",
                                  metadata={"image_id": image_id})
        image = current.value
        if holders:
            # Only an ACTIVE image can have users: that is the state to restore.
            image.state = State.ACTIVE
            txn.put(keys.image(image_id), image)
            return
        txn.delete(keys.image(image_id))
        txn.delete(keys.image_upload(image_id))
        for field in BOOT_PARTS:
            if getattr(image, field):
                drop_user(txn, getattr(image, field), image_id)

    await store.atomic(body)
    if holders:
        shown = ", ".join(holders[:5]) + (", ..." if len(holders) > 5 else "")
        raise errors.FailedPrecondition(
            f"image {image_id} is in use by {len(holders)} volume(s) or image(s): {shown}",
            reason=IN_USE, metadata={"image_id": image_id, "users": str(len(holders))})
    await bytes_store.delete(image_id)


async def recover_deletes(store: Store, bytes_store: image_store.ImageStore) -> int:
    """Finish deletes whose replica died after the mark; the number finished."""
    items, _ = await store.list_all(keys.IMAGES, image_pb2.Image)
    finished = 0
    cutoff = resources.now().seconds - STALE_MARK_SECONDS
    for item in items:
        image = item.value
        if image.state != State.DELETED or image.meta.update_time.seconds > cutoff:
            continue
        try:
            await finish_delete(store, bytes_store, image.meta.id, item.mod_revision)
        except (errors.FailedPrecondition, errors.Conflict) as exc:
            log.info("image delete recovered", image_id=image.meta.id, outcome=exc.reason)
        finished += 1
    return finished

