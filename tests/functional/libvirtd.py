"""A private libvirtd for tests that need a real privileged daemon.

Storage tests use its qemu driver's `dir` pools (real files that outlive an
agent's death); network tests its nwfilter driver, which the test driver
lacks and which works only in a privileged daemon.

The daemon runs as root in a mount namespace of its own
(``unshare --mount``): tmpfs over /run, /var/lib, /var/cache and /var/log and
a scratch directory over /etc/libvirt, so its state, filters, logs and
sockets are the test's alone and vanish with it, nothing of the machine's own
libvirt is read or changed, and several tests (or a libvirtd someone else
started) never collide. Its qemu.conf runs guests as root and leaves file
ownership alone. Where the machine lacks libvirt's QEMU user or groups
(libvirt-daemon-system makes them), the daemon sees a copy of /etc/passwd
and /etc/group that has them. No virtlogd is started: a guest's console log
is written by QEMU itself (``stdio_handler = "file"``). It runs under the
lab's reaper, so a destroyed guest's QEMU is reaped at once. Its
socket sits in the scratch directory, reached with
``qemu+unix:///system?socket=...``; at the end every guest it runs is
destroyed (QEMU outlives libvirtd) and the daemon is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from services.client.lab import daemons, reaper

START_TIMEOUT = 20.0
"""Seconds the daemon has to answer on its socket."""
_QEMU_USER = "libvirt-qemu"
_GROUPS = {"libvirt-qemu": 64055, "kvm": 64056, "libvirt": 64057}
_PRIVATE_DIRS = ("/run", "/var/lib", "/var/cache", "/var/log")


def missing_reason() -> str | None:
    """Why a private libvirtd cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "a private libvirtd (and its nwfilter driver) needs root"
    for program in ("libvirtd", "unshare"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def _missing_groups() -> list[str]:
    missing = []
    for name in _GROUPS:
        try:
            grp.getgrnam(name)
        except KeyError:
            missing.append(name)
    return missing


def _users_mounts(scratch: Path) -> list[str]:
    """Bind mounts of a passwd and group with libvirt's QEMU user and groups, where missing."""
    try:
        pwd.getpwnam(_QEMU_USER)
        user_missing = False
    except KeyError:
        user_missing = True
    groups = _missing_groups()
    if not user_missing and not groups:
        return []
    passwd, group = scratch / "passwd", scratch / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + (
        f"{_QEMU_USER}:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n" if user_missing
        else ""))
    group.write_text(Path("/etc/group").read_text()
                     + "".join(f"{name}:x:{_GROUPS[name]}:\n" for name in groups))
    return [f"mount --bind {passwd} /etc/passwd", f"mount --bind {group} /etc/group"]


def _script(scratch: Path) -> str:
    etc = scratch / "etc"
    etc.mkdir()
    (etc / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        # No virtlogd runs: QEMU writes a guest's console log file itself.
        'stdio_handler = "file"\n')
    config = scratch / "libvirtd.conf"
    config.write_text(f'unix_sock_dir = "{scratch / "sock"}"\nunix_sock_group = "root"\n'
                      'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')
    mounts = [f"mount -t tmpfs nubis-test-libvirt {d}" for d in _PRIVATE_DIRS]
    mounts.append(f"mount --bind {etc} /etc/libvirt")
    mounts += _users_mounts(scratch)
    # Under the reaper, the QEMU processes libvirtd orphans are reaped as soon as they end.
    daemon = reaper.argv(["libvirtd", "-f", str(config), "-p", str(scratch / "libvirtd.pid")])
    return " && ".join([*mounts, f"exec {shlex.join(daemon)}"])


@contextlib.contextmanager
def private_libvirtd(netns: str = "") -> Iterator[str]:
    """Run a private libvirtd until the block ends; yields the URI that reaches it.

    Skips the test where one cannot run here (`missing_reason`). With `netns`
    the daemon runs in that network namespace, so the filters it applies
    (ebtables, iptables) live there and nowhere else.
    """
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    # Unix socket paths are short: a directory right under the temporary root, not pytest's.
    scratch = Path(tempfile.mkdtemp(prefix="nubis-libvirtd-"))
    (scratch / "sock").mkdir()
    uri = f"qemu+unix:///system?socket={scratch / 'sock' / 'libvirt-sock'}"
    inside = ["ip", "netns", "exec", netns] if netns else []
    daemon: daemons.Daemon | None = None
    try:
        daemon = daemons.spawn(
            "libvirtd", [*inside, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                         _script(scratch)], scratch / "libvirtd.log")
        _wait_ready(uri, daemon)
        yield uri
    finally:
        if daemon is not None:
            if daemon.alive():
                _destroy_guests(uri)
            daemon.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _destroy_guests(uri: str) -> None:
    """End every guest the daemon runs: QEMU outlives a stopped libvirtd, and a test that
    failed before its own cleanup would leave its guests running."""
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(uri)
        try:
            for domain in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):
                    domain.destroy()
        finally:
            conn.close()


def _wait_ready(uri: str, daemon: daemons.Daemon) -> None:
    give_up = time.monotonic() + START_TIMEOUT
    while True:
        if not daemon.alive():
            raise RuntimeError(f"libvirtd exited ({daemon.proc.returncode}): "
                               f"{daemon.log_path.read_text()[-2000:]}")
        with contextlib.suppress(libvirt.libvirtError):
            libvirt.open(uri).close()
            return
        if time.monotonic() > give_up:
            raise RuntimeError(f"libvirtd did not answer on {uri} in {START_TIMEOUT} s")
        time.sleep(0.1)
