"""Registering the nubis guest (see guest_image) in storage: its kernel as a KERNEL image
`nubis-guest-kernel`, its initramfs as a RAMDISK image `nubis-guest-initrd`, and
`nubis-guest`, a small blank qcow2 that names both and the kernel command line, so a
server booted from it starts the guest by direct kernel boot (the disk is its vda).

Each is found by name before anything is made: run again, it makes nothing twice. An
image of the name whose upload died (QUEUED or ERROR) is uploaded again; one whose
boot parts are another build's is left as it is (images' boot parts are immutable).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client import image_stream
from services.client.commands import image as image_cli
from services.client.lab import guest_image, seed

if TYPE_CHECKING:
    from services.client.lab.components import PostStartContext

    StorageStub = storage_service_pb2_grpc.StorageServiceAsyncStub
Image = image_pb2.Image
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class GuestImages:
    """The three images of one registered guest."""

    kernel: image_pb2.Image
    ramdisk: image_pb2.Image
    guest: image_pb2.Image


@dataclass(frozen=True)
class GuestFiles:
    """A built guest's files as uploads (size and sha256 read before any call)."""

    kernel: seed.Upload
    ramdisk: seed.Upload
    disk: seed.Upload
    cmdline: str


def files_of(guest: guest_image.GuestImage) -> GuestFiles:
    """The uploads of a built guest."""
    def upload(path: Path) -> seed.Upload:
        return seed.Upload(path, path.stat().st_size, image_cli.sha256_of(path))
    return GuestFiles(upload(guest.kernel), upload(guest.initrd), upload(guest.disk),
                      guest.cmdline)


def seed_guest(ctx: PostStartContext) -> None:
    """Build (or find in the lab's data dir) the guest and register it, public. A lab that
    cannot build it (no Debian package index, no way to the mirror) says so and goes on.
    Only where the lab wants it (a qemu lab, or NUBIS_LAB_GUEST=1)."""
    from services.client.lab import components  # components imports this module when run

    if not components.guest_wanted(ctx.plan):
        return
    seeder = seed.Seeder(ctx)
    try:
        guest = guest_image.build_guest(ctx.plan.data_dir / "seed")
    except guest_image.GuestBuildError as exc:
        seeder.say(f"image {guest_image.GUEST_NAME}: not built ({exc}); skipped")
        return
    files = files_of(guest)
    found = seeder.run("storage", image_stream.storage_stub,
                       lambda s: ensure_guest(s, files))
    if found is not None:
        seeder.say(f"image {guest_image.GUEST_NAME}: {found.guest.meta.id} (direct kernel "
                   "boot: says NUBIS-GUEST-UP and its address on the console, serves HTTP)")


async def ensure_guest(s: StorageStub, guest: GuestFiles,
                       metadata: Metadata = ()) -> GuestImages:
    """The guest's kernel, ramdisk and disk image, public, each made and uploaded unless an
    ACTIVE one of its name is there. `s` is a stub of `image_stream.storage_stub` (the
    uploads go pre-encoded)."""
    about = "Made by nubis from Debian's packages: the nubis guest's"
    kernel = await _ensure(s, metadata, Image(
        meta=resource_pb2.ResourceMeta(name=guest_image.KERNEL_NAME,
                                       description=f"{about} kernel."),
        disk_format=Image.DISK_FORMAT_KERNEL, visibility=Image.VISIBILITY_PUBLIC),
        guest.kernel)
    ramdisk = await _ensure(s, metadata, Image(
        meta=resource_pb2.ResourceMeta(name=guest_image.RAMDISK_NAME,
                                       description=f"{about} busybox initramfs."),
        disk_format=Image.DISK_FORMAT_RAMDISK, visibility=Image.VISIBILITY_PUBLIC),
        guest.ramdisk)
    disk = await _ensure(s, metadata, Image(
        meta=resource_pb2.ResourceMeta(
            name=guest_image.GUEST_NAME, description=f"{about} blank disk; boots the kernel "
            "and initramfs, which print NUBIS-GUEST-UP and each address on ttyS0."),
        disk_format=Image.DISK_FORMAT_QCOW2, min_disk_gb=1,
        visibility=Image.VISIBILITY_PUBLIC, kernel_image_id=kernel.meta.id,
        ramdisk_image_id=ramdisk.meta.id, kernel_cmdline=guest.cmdline,
        properties={"os_distro": "debian", "hw_disk_bus": "virtio"}), guest.disk)
    return GuestImages(kernel, ramdisk, disk)


async def _ensure(s: StorageStub, metadata: Metadata, wanted: image_pb2.Image,
                  upload: seed.Upload) -> image_pb2.Image:
    reply = await s.ListImages(image_pb2.ListImagesRequest(filter=f"name={wanted.meta.name}"),
                               metadata=metadata)
    image = next(iter(reply.images), None)
    if image is not None and image.state == Image.ACTIVE:
        return image
    if image is None or image.state not in (Image.QUEUED, Image.ERROR):
        image = await s.CreateImage(image_pb2.CreateImageRequest(image=wanted),
                                    metadata=metadata)
    uploaded: image_pb2.Image = await s.UploadImage(image_cli.upload_requests(
        image.meta.id, upload.path, upload.size, upload.sha256, lambda _: None),
        metadata=metadata)
    return uploaded
