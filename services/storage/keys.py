"""Storage's etcd keys (relative to the store root), one function per record."""

from __future__ import annotations

from services.common import resources

IMAGES = "storage/images/"
VOLUMES = "storage/volumes/"
SNAPSHOTS = "storage/snapshots/"
ATTACHMENTS = "storage/attachments/"
POOLS = "storage/pools/"
IMAGE_USERS = "storage/image-users/"
IMAGE_UPLOADS = "storage/image-uploads/"
OPERATIONS = "storage/operations/"
VOLUME_SNAPSHOTS = "storage/volume-snapshots/"
SNAPSHOT_USERS = "storage/snapshot-users/"
ROOT_DISKS = "storage/root-disks/"


def image(image_id: str) -> str:
    return resources.key(IMAGES, image_id)


def image_user(image_id: str, user_id: str) -> str:
    """`user_id` (a volume, or an image naming it as kernel/ramdisk) uses the image's bytes."""
    return resources.key(IMAGE_USERS, image_id, user_id)


def image_users(image_id: str) -> str:
    """Prefix of every user of one image: while any key is under it the image stays."""
    return resources.key(IMAGE_USERS, image_id, "")


def image_upload(image_id: str) -> str:
    """The upload in progress of an image, under the streaming replica's lease."""
    return resources.key(IMAGE_UPLOADS, image_id)


def volume(volume_id: str) -> str:
    return resources.key(VOLUMES, volume_id)


def snapshot(snapshot_id: str) -> str:
    return resources.key(SNAPSHOTS, snapshot_id)


def attachment(attachment_id: str) -> str:
    return resources.key(ATTACHMENTS, attachment_id)


def pool(pool_id: str) -> str:
    """An operator's record of a pool (name, labels, ratio, state); facts come from the node."""
    return resources.key(POOLS, pool_id)


def operation(resource_id: str) -> str:
    """The operation in flight on a volume or snapshot (at most one at a time)."""
    return resources.key(OPERATIONS, resource_id)


def volume_snapshot(volume_id: str, snapshot_id: str) -> str:
    """Index: `snapshot_id` was taken of `volume_id` (the volume cannot be deleted)."""
    return resources.key(VOLUME_SNAPSHOTS, volume_id, snapshot_id)


def volume_snapshots(volume_id: str) -> str:
    """Prefix of every snapshot index key of one volume."""
    return resources.key(VOLUME_SNAPSHOTS, volume_id, "")


def snapshot_user(snapshot_id: str, volume_id: str) -> str:
    """Index: `volume_id` is an overlay on `snapshot_id` (the snapshot cannot be deleted)."""
    return resources.key(SNAPSHOT_USERS, snapshot_id, volume_id)


def snapshot_users(snapshot_id: str) -> str:
    """Prefix of every volume made from one snapshot."""
    return resources.key(SNAPSHOT_USERS, snapshot_id, "")


def root_disk(instance_id: str) -> str:
    """The root disk volume of an instance: one per instance, made once."""
    return resources.key(ROOT_DISKS, instance_id)
