"""The nubis guest: a tiny Linux made only from Debian packages, booted by direct kernel
boot. Its kernel is Debian's cloud kernel and its initramfs busybox (busybox-static)
with the virtio modules from the kernel package and the scripts of deploy/guest/: it
says on the serial console that it is up, the address DHCP gave each NIC, and the
marker it finds (or writes) on each virtio disk; it answers ping and serves a one-line
page naming itself over HTTP, with CGI scripts that make it act on request
(/cgi-bin/ping?target=IP pings IP; /cgi-bin/ping-from?target=IP&source=ADDR pings it
from an address nubis did not give it, /cgi-bin/mac-ping?target=IP&mac=MAC from a MAC
it did not give, and /cgi-bin/arp-claim?address=IP announces another port's address
over ARP: the port's filter must drop all three).

Both packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x`
(nothing is installed on the host). A build is cached under a state dir, keyed by the
package versions and the scripts, and made again only when missing. `register_guest`
uploads the kernel, the ramdisk and a small blank disk naming both to storage.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The drivers the guest needs (those the kernel does not have built in are loaded).
WANTED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
CMDLINE = "console=ttyS0 quiet"
KERNEL_NAME = "nubis-guest-kernel"
RAMDISK_NAME = "nubis-guest-initrd"
GUEST_NAME = "nubis-guest"
GUEST_DISK_SIZE = "1G"
SCRIPTS_DIR = Path(__file__).resolve().parents[3] / "deploy" / "guest"
# Script in deploy/guest/ -> where the initramfs holds it.
SCRIPTS = {"init": "init", "udhcpc.script": "etc/udhcpc.script",
           "disk-check": "bin/disk-check", "disk-watch": "bin/disk-watch",
           "cgi-ping": "www/cgi-bin/ping", "cgi-ping-from": "www/cgi-bin/ping-from",
           "cgi-arp-claim": "www/cgi-bin/arp-claim", "cgi-mac-ping": "www/cgi-bin/mac-ping"}
_RUN_TIMEOUT = 300


class GuestBuildError(RuntimeError):
    """A step of the guest build failed (apt, dpkg-deb or a missing module)."""


@dataclass(frozen=True)
class Package:
    """A Debian binary package at the version apt would fetch."""

    name: str
    version: str


@dataclass(frozen=True)
class GuestImage:
    """A built guest: its files, command line, and what went into it."""

    directory: Path
    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str
    modules: tuple[str, ...]
    build_seconds: float


def _run(argv: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=_RUN_TIMEOUT,
                          check=False, env={**os.environ, "LC_ALL": "C"})
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)}: exit {done.returncode}: "
                              f"{done.stderr.strip()[-500:]}")
    return done.stdout


def candidate(name: str) -> Package:
    """The version of `name` apt would fetch; a root caller whose package index does not
    know it yet (a fresh machine) runs `apt-get update` once."""
    for attempt in range(2):
        found = re.search(r"Candidate:\s*(\S+)", _run(["apt-cache", "policy", name]))
        if found is not None and found.group(1) != "(none)":
            return Package(name, found.group(1))
        if attempt == 0 and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"])
    raise GuestBuildError(f"apt knows no package {name} (apt-get update first?)")


def kernel_package() -> Package:
    """The versioned kernel package the metapackage depends on."""
    candidate(KERNEL_PACKAGE)  # the index knows it (updated if not)
    out = _run(["apt-cache", "depends", KERNEL_PACKAGE])
    found = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if found is None:
        raise GuestBuildError(f"{KERNEL_PACKAGE} names no kernel package")
    return candidate(found.group(1))


def cache_key(packages: Iterable[Package]) -> str:
    """The build's name: the package versions and a digest of the guest's scripts."""
    digest = hashlib.sha256(CMDLINE.encode())
    for script in sorted(SCRIPTS):
        digest.update((SCRIPTS_DIR / script).read_bytes())
    versions = "+".join(f"{p.name}_{p.version}" for p in packages)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", versions) + "-" + digest.hexdigest()[:12]


def fetch(package: Package, into: Path) -> Path:
    """`apt-get download` the package into `into` and unpack it to into/<name>/."""
    _run(["apt-get", "download", "-q", f"{package.name}={package.version}"], cwd=into)
    debs = sorted(into.glob(f"{package.name}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download left no .deb of {package.name}")
    tree = into / package.name
    _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
    return tree


def module_depends(ko: Path) -> list[str]:
    """The `depends=` of a kernel module's .modinfo (the package ships no modules.dep)."""
    found = re.search(rb"\0depends=([^\0]*)\0", b"\0" + ko.read_bytes())
    if found is None or not found.group(1):
        return []
    return [name.decode() for name in found.group(1).split(b",")]


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[Path]:
    """The .ko files to load for `wanted`, each after its dependencies; modules the
    kernel has built in (modules.builtin) are left out."""
    builtin = {Path(line).stem.replace("-", "_")
               for line in (modules_dir / "modules.builtin").read_text().split()}
    files = {ko.stem.replace("-", "_"): ko for ko in (modules_dir / "kernel").rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in builtin or files.get(name) in order:
            return
        if name not in files:
            raise GuestBuildError(f"kernel module {name} is neither built in nor shipped")
        if name in trail:
            raise GuestBuildError(f"kernel modules depend in a circle: {trail}")
        for dep in module_depends(files[name]):
            visit(dep, (*trail, name))
        order.append(files[name])

    for name in wanted:
        visit(name, ())
    return order


def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (cpio "newc") of (path, mode, data) entries, then TRAILER!!!."""
    out = io.BytesIO()
    for ino, (path, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + name)
        out.write(b"\0" * (-(110 + len(name)) % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


def initramfs_entries(busybox: Path, modules: list[Path]) -> list[tuple[str, int, bytes]]:
    """What the guest's initramfs holds: dirs, /dev/console, busybox, scripts, modules."""
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "sbin", "dev", "etc", "proc", "sys", "tmp",
                                     "run", "www", "www/cgi-bin", "lib", "lib/modules")]
    # A character device 5:1 is set by the kernel on unpacking; newc carries rdev, so the
    # console is made by devtmpfs instead and /init opens it after mounting /dev.
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    # The scripts' interpreter; /init links the other applets at boot.
    entries.append(("bin/sh", 0o120777, b"busybox"))
    for script, target in SCRIPTS.items():
        entries.append((target, 0o100755, (SCRIPTS_DIR / script).read_bytes()))
    for ko in modules:
        entries.append((f"lib/modules/{ko.name}", 0o100644, ko.read_bytes()))
    listing = "".join(f"{ko.name}\n" for ko in modules)
    entries.append(("etc/modules", 0o100644, listing.encode()))
    return entries


def _make_disk(target: Path) -> None:
    """A blank qcow2 for the image that names the kernel and ramdisk (attached as vda)."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), GUEST_DISK_SIZE])


def _build(directory: Path, kernel: Package, busybox: Package) -> GuestImage:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch_name:
        scratch = Path(scratch_name)
        kernel_tree = fetch(kernel, scratch)
        busybox_tree = fetch(busybox, scratch)
        modules_dir = next((kernel_tree / "lib" / "modules").iterdir())
        modules = resolve_modules(modules_dir, WANTED_MODULES)
        staged = scratch / "out"
        staged.mkdir()
        shutil.copyfile(next((kernel_tree / "boot").glob("vmlinuz-*")), staged / "vmlinuz")
        archive = cpio_newc(initramfs_entries(busybox_tree / "bin" / "busybox", modules))
        (staged / "initrd.gz").write_bytes(gzip.compress(archive, compresslevel=9, mtime=0))
        _make_disk(staged / "disk.qcow2")
        seconds = round(time.monotonic() - started, 2)
        (staged / "build.json").write_text(json.dumps({
            "packages": {kernel.name: kernel.version, busybox.name: busybox.version},
            "modules": [ko.name for ko in modules], "cmdline": CMDLINE,
            "build_seconds": seconds}, indent=1))
        staged.replace(directory)
    return load(directory)


def load(directory: Path) -> GuestImage:
    """A guest built before into `directory`."""
    meta = json.loads((directory / "build.json").read_text())
    return GuestImage(directory, directory / "vmlinuz", directory / "initrd.gz",
                      directory / "disk.qcow2", str(meta["cmdline"]),
                      tuple(meta["modules"]), float(meta["build_seconds"]))


def build_guest(state_dir: Path) -> GuestImage:
    """The guest for the packages apt offers now: from state_dir/guest/<key>/ if it was
    built before, else built there."""
    kernel, busybox = kernel_package(), candidate(BUSYBOX_PACKAGE)
    directory = state_dir / "guest" / cache_key([kernel, busybox])
    if (directory / "build.json").is_file():
        return load(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    return _build(directory, kernel, busybox)


def main(argv: list[str] | None = None) -> int:
    """`deploy/guest/build STATE_DIR`: build (or find) the guest and print its files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("state_dir", type=Path)
    guest = build_guest(parser.parse_args(argv).state_dir)
    for label, path in (("kernel", guest.kernel), ("initrd", guest.initrd),
                        ("disk", guest.disk)):
        print(f"{label}: {path} ({path.stat().st_size} bytes)")
    print(f"cmdline: {guest.cmdline}\nbuilt in: {guest.build_seconds}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
