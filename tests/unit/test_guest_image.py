"""What the nubis guest's initramfs holds: its /init and scripts, busybox as /bin/sh, and
the kernel modules it loads, each after the modules it depends on (read from the
modules' own modinfo), leaving out those the kernel has built in."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from services.client.lab import guest_image


def read_newc(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """Path -> (mode, data) of a cpio newc archive, checking its framing."""
    found: dict[str, tuple[int, bytes]] = {}
    at = 0
    while True:
        assert archive[at:at + 6] == b"070701"
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = archive[at + 110:at + 110 + name_size - 1].decode()
        at += 110 + name_size
        at += -at % 4
        if name == "TRAILER!!!":
            return found
        found[name] = (mode, archive[at:at + size])
        at += size
        at += -at % 4


def fake_kernel(root: Path) -> Path:
    """A modules tree: virtio_blk -> virtio, virtio_ring; virtio_net -> net_failover ->
    failover; virtio_pci built in."""
    modules = root / "lib" / "modules" / "6.1.0-test"
    deps = {"drivers/virtio/virtio": "virtio_ring", "drivers/virtio/virtio_ring": "",
            "drivers/block/virtio_blk": "virtio,virtio_ring",
            "drivers/net/virtio_net": "net_failover", "drivers/net/net_failover": "failover",
            "net/core/failover": "", "drivers/virtio/virtio_mem": "virtio"}
    for path, depends in deps.items():
        ko = modules / "kernel" / f"{path}.ko"
        ko.parent.mkdir(parents=True, exist_ok=True)
        ko.write_bytes(b"\x7fELF..\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    return modules


def test_modules_are_resolved_dependencies_first_without_builtins(tmp_path: Path) -> None:
    order = [ko.stem for ko in guest_image.resolve_modules(
        fake_kernel(tmp_path), guest_image.WANTED_MODULES)]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "failover", "net_failover",
                     "virtio_net"]


def test_a_module_neither_built_in_nor_shipped_fails_the_build(tmp_path: Path) -> None:
    with pytest.raises(guest_image.GuestBuildError, match="virtio_gpu"):
        guest_image.resolve_modules(fake_kernel(tmp_path), ["virtio_gpu"])


def test_the_initramfs_holds_init_busybox_scripts_and_the_listed_modules(
        tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    modules = guest_image.resolve_modules(fake_kernel(tmp_path), guest_image.WANTED_MODULES)
    archive = guest_image.cpio_newc(guest_image.initramfs_entries(busybox, modules))
    files = read_newc(gzip.decompress(gzip.compress(archive)))
    mode, init = files["init"]
    assert mode == 0o100755 and init.startswith(b"#!/bin/sh\n")
    for line in (b"NUBIS-GUEST-UP", b"udhcpc", b"httpd -p 80", b"/bin/disk-watch", b"insmod"):
        assert line in init
    assert files["bin/sh"] == (0o120777, b"busybox")
    assert files["bin/busybox"] == (0o100755, b"\x7fELF busybox")
    assert b"NUBIS-GUEST-IP" in files["etc/udhcpc.script"][1]
    assert b"NUBIS-GUEST-DISK" in files["bin/disk-check"][1]
    listed = files["etc/modules"][1].decode().split()
    assert listed == [ko.name for ko in modules] and "virtio_pci.ko" not in listed
    for name in listed:
        assert files[f"lib/modules/{name}"][1].startswith(b"\x7fELF")
    assert files["dev"][0] == 0o040755


def test_every_guest_script_is_in_the_initramfs_with_the_cgi_ones_under_www(
        tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    files = read_newc(guest_image.cpio_newc(guest_image.initramfs_entries(busybox, [])))
    shipped = {path.name for path in guest_image.SCRIPTS_DIR.iterdir()} - {"build"}
    assert shipped == set(guest_image.SCRIPTS)
    assert files["www/cgi-bin"][0] == 0o040755
    for cgi in ("ping", "ping-from", "mac-ping", "arp-claim"):
        mode, script = files[f"www/cgi-bin/{cgi}"]
        assert mode == 0o100755 and b"Content-Type: text/plain" in script


def test_a_changed_script_changes_the_cache_key(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = tmp_path / "guest"
    scripts.mkdir()
    for name in guest_image.SCRIPTS:
        (scripts / name).write_bytes((guest_image.SCRIPTS_DIR / name).read_bytes())
    monkeypatch.setattr(guest_image, "SCRIPTS_DIR", scripts)
    packages = [guest_image.Package("busybox-static", "1:1.35.0-4")]
    before = guest_image.cache_key(packages)
    (scripts / "cgi-ping").write_bytes((scripts / "cgi-ping").read_bytes() + b"# changed\n")
    assert guest_image.cache_key(packages) != before
    assert guest_image.cache_key(packages).startswith("busybox-static_1_1.35.0-4-")
