"""The nubis guest registered in a real storage service: a KERNEL image, a RAMDISK image
and a qcow2 naming both with the guest's command line, all public and ACTIVE with the
built files' bytes; registered again, the same three images are found."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.client import image_stream
from services.client.lab import guest_image, guest_seed
from tests.functional.storage.harness import Format, StorageWorld


@pytest.fixture(scope="session")
def guest(request: pytest.FixtureRequest) -> guest_image.GuestImage:
    """Built once per cache dir (kept between runs while the package versions hold)."""
    return guest_image.build_guest(Path(request.config.cache.mkdir("nubis-guest")))


@pytest.mark.slow
async def test_the_guest_is_registered_as_a_kernel_boot_image_set_once(
        storage: StorageWorld, guest: guest_image.GuestImage) -> None:
    files = guest_seed.files_of(guest)
    admin = storage.as_("cloud_admin")
    stub = image_stream.storage_stub(storage.channel)  # uploads go pre-encoded
    made = await guest_seed.ensure_guest(stub, files, admin)
    for image, upload, form in ((made.kernel, files.kernel, Format.DISK_FORMAT_KERNEL),
                                (made.ramdisk, files.ramdisk, Format.DISK_FORMAT_RAMDISK),
                                (made.guest, files.disk, Format.DISK_FORMAT_QCOW2)):
        assert (image.state, image.visibility, image.disk_format) == (
            image.ACTIVE, image.VISIBILITY_PUBLIC, form)
        assert (image.size_bytes, image.checksum_sha256) == (upload.size, upload.sha256)
    assert [made.kernel.meta.name, made.ramdisk.meta.name, made.guest.meta.name] == [
        "nubis-guest-kernel", "nubis-guest-initrd", "nubis-guest"]
    assert (made.guest.kernel_image_id, made.guest.ramdisk_image_id,
            made.guest.kernel_cmdline) == (made.kernel.meta.id, made.ramdisk.meta.id,
                                           "console=ttyS0 quiet")
    again = await guest_seed.ensure_guest(stub, files, admin)
    assert [i.meta.id for i in (again.kernel, again.ramdisk, again.guest)] == [
        i.meta.id for i in (made.kernel, made.ramdisk, made.guest)]
