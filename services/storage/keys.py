"""Storage's etcd keys (relative to the store root), one function per record."""

from __future__ import annotations

from services.common import resources

IMAGES = "storage/images/"
VOLUMES = "storage/volumes/"
SNAPSHOTS = "storage/snapshots/"
ATTACHMENTS = "storage/attachments/"
POOLS = "storage/pools/"


def image(image_id: str) -> str:
    return resources.key(IMAGES, image_id)


def volume(volume_id: str) -> str:
    return resources.key(VOLUMES, volume_id)


def snapshot(snapshot_id: str) -> str:
    return resources.key(SNAPSHOTS, snapshot_id)


def attachment(attachment_id: str) -> str:
    return resources.key(ATTACHMENTS, attachment_id)


def pool(node: str) -> str:
    return resources.key(POOLS, node)
