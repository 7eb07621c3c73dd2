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


def pool(node: str) -> str:
    return resources.key(POOLS, node)
