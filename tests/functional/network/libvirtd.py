"""A private libvirtd for tests that need libvirt's nwfilter driver (the test driver has none).

The daemon runs as root (the nwfilter driver works only in a privileged
daemon) in a mount namespace of its own: tmpfs over /run, /var/lib,
/var/cache and /var/log and a scratch directory over /etc/libvirt, so its
state, its filters and its sockets are the test's alone and vanish with it,
and nothing of the machine's own libvirt is read or changed. Its socket sits
in a scratch directory the test connects to with
``qemu+unix:///system?socket=...``. Where the machine lacks libvirt's
unprivileged QEMU user (libvirt-daemon-system makes it), the daemon sees a
copy of /etc/passwd and /etc/group that has one.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

START_TIMEOUT = 20.0
"""Seconds the daemon has to answer on its socket."""
_QEMU_USER = "libvirt-qemu"
_PRIVATE_DIRS = ("/run", "/var/lib", "/var/cache", "/var/log")


def missing_reason() -> str | None:
    """Why a private libvirtd cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "libvirt's nwfilter driver needs a privileged (root) libvirtd"
    for program in ("libvirtd", "unshare"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _script(scratch: Path) -> str:
    mounts = [f"mount -t tmpfs nubis-test-libvirt {d}" for d in _PRIVATE_DIRS]
    mounts.append(f"mount --bind {scratch / 'etc'} /etc/libvirt")
    if not _has_user(_QEMU_USER):
        passwd, group = scratch / "passwd", scratch / "group"
        passwd.write_text(Path("/etc/passwd").read_text()
                          + f"{_QEMU_USER}:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n")
        group.write_text(Path("/etc/group").read_text() + f"{_QEMU_USER}:x:64055:\n")
        mounts += [f"mount --bind {passwd} /etc/passwd", f"mount --bind {group} /etc/group"]
    config = scratch / "libvirtd.conf"
    config.write_text(f'unix_sock_dir = "{scratch / "sock"}"\nauth_unix_rw = "none"\n'
                      'auth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')
    return " && ".join([*mounts, f"exec libvirtd -f {config} -p {scratch / 'libvirtd.pid'}"])


@contextlib.contextmanager
def private_libvirtd(netns: str = "") -> Iterator[str]:
    """Run a private libvirtd until the block ends; yields the URI that reaches it.

    With `netns` the daemon runs in that network namespace, so the filters it
    applies (ebtables, iptables) live there and nowhere else.
    """
    scratch = Path(tempfile.mkdtemp(prefix="nubis-libvirtd-"))
    (scratch / "etc").mkdir()
    (scratch / "sock").mkdir()
    uri = f"qemu+unix:///system?socket={scratch / 'sock' / 'libvirt-sock'}"
    log = (scratch / "libvirtd.log").open("w")
    inside = ["ip", "netns", "exec", netns] if netns else []
    daemon = subprocess.Popen([*inside, "unshare", "--mount", "--propagation", "private", "sh",
                               "-c", _script(scratch)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(uri, daemon, scratch)
        yield uri
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=5)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_ready(uri: str, daemon: subprocess.Popen[bytes], scratch: Path) -> None:
    give_up = time.monotonic() + START_TIMEOUT
    while True:
        if daemon.poll() is not None:
            raise RuntimeError(f"libvirtd exited ({daemon.returncode}): "
                               f"{(scratch / 'libvirtd.log').read_text()[-2000:]}")
        with contextlib.suppress(libvirt.libvirtError):
            libvirt.open(uri).close()
            return
        if time.monotonic() > give_up:
            raise RuntimeError(f"libvirtd did not answer on {uri} in {START_TIMEOUT} s")
        time.sleep(0.1)
