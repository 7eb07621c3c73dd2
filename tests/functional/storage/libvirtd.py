"""A private libvirtd for `qemu`-marked storage tests: real files in a real `dir` pool.

The daemon runs in a mount namespace of its own (``unshare --mount``) with
libvirt's configuration, state and run directories, and a passwd/group that
know libvirt's qemu user, bind-mounted from a scratch directory: nothing of
the host's libvirt (if any) is read or changed, and several tests (or a
libvirtd someone else started) never collide. Its socket is reached with
``qemu:///system?socket=...``. Storage needs no virtlogd (no guest runs), so
none is started. Stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from services.client.lab import daemons

_SCRIPT = """set -e
for name in etc lib run cache; do mkdir -p "$ROOT/$name"; done
mkdir -p /etc/libvirt /var/lib/libvirt /run/libvirt /var/cache/libvirt
mount --bind "$ROOT/etc" /etc/libvirt
mount --bind "$ROOT/lib" /var/lib/libvirt
mount --bind "$ROOT/run" /run/libvirt
mount --bind "$ROOT/cache" /var/cache/libvirt
mount --bind "$ROOT/passwd" /etc/passwd
mount --bind "$ROOT/group" /etc/group
exec libvirtd -f "$ROOT/libvirtd.conf" -p "$ROOT/libvirtd.pid"
"""


def _prepare(root: Path) -> None:
    (root / "sock").mkdir()
    (root / "etc").mkdir()
    (root / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{root}/sock"\nunix_sock_group = "root"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')
    # Run guests (none here) as root and leave file ownership alone.
    (root / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n')
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    if "libvirt-qemu:" not in passwd:
        passwd += "libvirt-qemu:x:64055:64055:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
    for name, gid in (("libvirt-qemu", 64055), ("kvm", 64056), ("libvirt", 64057)):
        if f"\n{name}:" not in f"\n{group}":
            group += f"{name}:x:{gid}:\n"
    (root / "passwd").write_text(passwd)
    (root / "group").write_text(group)
    (root / "start.sh").write_text(_SCRIPT)


@contextlib.contextmanager
def private_libvirtd() -> Iterator[str]:
    """A libvirtd of this test's own; yields its `qemu:///system` URI. Skips where it cannot run."""
    if os.geteuid() != 0 or not shutil.which("libvirtd") or not shutil.which("unshare"):
        pytest.skip("a private libvirtd needs root, libvirtd and unshare")
    # Unix socket paths are short: a directory right under /tmp, not pytest's.
    root = Path(tempfile.mkdtemp(prefix="nubis-lv-"))
    daemon: daemons.Daemon | None = None
    try:
        _prepare(root)
        daemon = daemons.spawn(
            "libvirtd", ["unshare", "--mount", "--propagation", "private", "sh",
                         str(root / "start.sh")], root / "libvirtd.log",
            env={**os.environ, "ROOT": str(root)})
        uri = f"qemu:///system?socket={root / 'sock' / 'libvirt-sock'}"
        deadline = time.monotonic() + 20
        while not _answers(uri):
            if not daemon.alive() or time.monotonic() > deadline:
                log = (root / "libvirtd.log").read_text()[-800:]
                pytest.skip(f"libvirtd did not start: {log}")
            time.sleep(0.2)
        yield uri
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def _answers(uri: str) -> bool:
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError:
        return False
    return True
