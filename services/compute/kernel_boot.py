"""Direct kernel boot of a server: the image's kernel, ramdisk and command line.

An image that names a kernel image (Glance's kernel_id, ramdisk_id and
os_command_line) boots by direct kernel boot: the domain gets the kernel and
ramdisk as cached-image sources, which the node's agent fetches into its image
cache before defining the domain, and the command line. An image that names
no kernel (or a boot from a volume) boots from its root disk.
"""

from __future__ import annotations

from typing import Any

from nubis.agent.v1 import tasks_pb2
from nubis.storage.v1 import image_pb2

Image = image_pb2.Image
_FORMATS = {Image.DISK_FORMAT_KERNEL: "kernel", Image.DISK_FORMAT_RAMDISK: "ramdisk"}


def _source(image: Image) -> tasks_pb2.CachedImageSource:
    return tasks_pb2.CachedImageSource(
        image_id=image.meta.id, size_bytes=image.size_bytes, sha256=image.checksum_sha256,
        disk_format=_FORMATS.get(image.disk_format, "raw"))


async def of_image(storage: Any, image_id: str) -> tasks_pb2.KernelBoot | None:
    """The kernel boot of a server of `image_id` (None: it boots from its disk). `storage`
    is compute's StorageService client."""
    if not image_id:
        return None
    image: Image = await storage.GetImage(image_pb2.GetImageRequest(id=image_id))
    if not image.kernel_image_id:
        return None
    kernel: Image = await storage.GetImage(image_pb2.GetImageRequest(id=image.kernel_image_id))
    boot = tasks_pb2.KernelBoot(kernel=_source(kernel), cmdline=image.kernel_cmdline)
    if image.ramdisk_image_id:
        ramdisk: Image = await storage.GetImage(
            image_pb2.GetImageRequest(id=image.ramdisk_image_id))
        boot.ramdisk.CopyFrom(_source(ramdisk))
    return boot
