"""The QEMU driver of a lab (`nubis lab up --driver qemu`): guests under a private libvirtd.

The lab owns everything it makes here. One network namespace of its own
(``nubis-lab-<hash of the state dir>``) holds the agents' kernel dataplane
(bridges, VXLAN, dnsmasq; the DHCP and router namespaces it makes are named
``<that namespace>.…``) and the libvirtd whose taps join those bridges. The
libvirtd runs as root in a mount namespace of its own (tmpfs over /run,
/var/lib, /var/cache and /var/log; its config over /etc/libvirt), so nothing
of the machine's libvirt is read or changed; its socket is
``<state dir>/libvirt/sock/libvirt-sock``, reached with
``qemu+unix:///system?socket=…``: the privileged (system) driver, private to
the lab. No virtlogd runs: QEMU writes each guest's console log file itself
(``stdio_handler = "file"``). libvirtd runs under the lab's reaper
(`reaper`), so the QEMU processes it daemonizes are reaped the moment they
end, not whenever the machine's PID 1 gets to them (a guest's destroy waits
for that). `down` destroys the guests (QEMU outlives
libvirtd), the runner stops libvirtd by its recorded PID, and `cleanup`
deletes the lab's namespaces, which takes every device in them along.

`accelerator` decides between KVM and TCG by booting the lab image, then the
nubis guest's Linux when it is built, under ``-accel kvm -cpu host`` for a few
seconds each: /dev/kvm may exist where KVM cannot run a guest (QEMU aborts
setting the host CPU's MSRs, or a Linux kernel hangs before its first line
while a boot sector runs).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from services.client.lab import reaper
from services.common import errors

QEMU = "qemu"
TEST = "test"
DRIVERS = (TEST, QEMU)
KVM, TCG = "kvm", "tcg"
ACCEL_TRAIT = {KVM: "CUSTOM_NUBIS_ACCEL_KVM", TCG: "CUSTOM_NUBIS_ACCEL_TCG"}
"""The trait each node reports (`nubis node show`) for how its guests run."""
VIRT_TYPE = {KVM: "kvm", TCG: "qemu"}
"""libvirt's domain type for each accelerator."""
LIBVIRTD = "libvirtd"
APT_FIX = ("apt-get install -y libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils "
           "dnsmasq-base iproute2")
# (binary, Debian package) the qemu driver runs.
_PROGRAMS = (("libvirtd", "libvirt-daemon-system"), ("qemu-system-x86_64", "qemu-system-x86"),
             ("qemu-img", "qemu-utils"), ("dnsmasq", "dnsmasq-base"), ("ip", "iproute2"),
             ("unshare", "util-linux"), ("virsh", "libvirt-clients"))
_PROBE_TIMEOUT = 8.0
_PROBE_MARKER = b"booted"
_LINUX_MARKER = b"NUBIS-GUEST-UP"
_QEMU_USER = "libvirt-qemu"
_GROUPS = {"libvirt-qemu": 64055, "kvm": 64056, "libvirt": 64057}
_PRIVATE_DIRS = ("/run", "/var/lib", "/var/cache", "/var/log")
_SOCKET_MAX = 107


def preflight() -> None:
    """FailedPrecondition naming the exact fix when the qemu driver cannot run here."""
    if os.geteuid() != 0:
        raise errors.FailedPrecondition(
            "--driver qemu needs root (a privileged libvirtd and the kernel dataplane's "
            "bridges and namespaces); run `sudo nubis lab up --driver qemu`",
            reason="nubis.lab.qemu_needs_root")
    missing = [(program, package) for program, package in _PROGRAMS
               if shutil.which(program) is None]
    if missing:
        packages = " ".join(sorted({package for _, package in missing}))
        raise errors.FailedPrecondition(
            f"--driver qemu needs {', '.join(p for p, _ in missing)}; install with: "
            f"apt-get install -y {packages}", reason="nubis.lab.missing_binary",
            metadata={"fix": APT_FIX})


def netns(state_dir: Path) -> str:
    """The lab's network namespace: named after its state dir, so two labs never share one."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"nubis-lab-{digest}"


def libvirt_dir(state_dir: Path) -> Path:
    return state_dir / "libvirt"


def uri(state_dir: Path) -> str:
    """The URI of the lab's libvirtd (its socket in the state dir)."""
    return f"qemu+unix:///system?socket={libvirt_dir(state_dir) / 'sock' / 'libvirt-sock'}"


def is_qemu_lab(state_dir: Path) -> bool:
    return (libvirt_dir(state_dir) / "libvirtd.conf").is_file()


def prepare(state_dir: Path) -> None:
    """The lab's namespace and libvirtd config (before libvirtd starts)."""
    socket = libvirt_dir(state_dir) / "sock" / "libvirt-sock"
    if len(str(socket)) > _SOCKET_MAX:
        raise errors.FailedPrecondition(
            f"the libvirt socket path {socket} is too long for a unix socket; use a shorter "
            "--state-dir", reason="nubis.lab.state_dir_unusable")
    (libvirt_dir(state_dir) / "sock").mkdir(parents=True, exist_ok=True)
    name = netns(state_dir)
    if name not in _namespaces():
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=10)
    _write_config(libvirt_dir(state_dir))


def libvirtd_argv(state_dir: Path) -> list[str]:
    """libvirtd in the lab's network namespace and a mount namespace of its own."""
    return ["ip", "netns", "exec", netns(state_dir), "unshare", "--mount", "--propagation",
            "private", "sh", "-c", _script(libvirt_dir(state_dir))]


def _write_config(scratch: Path) -> None:
    etc = scratch / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
        'stdio_handler = "file"\n')
    (scratch / "libvirtd.conf").write_text(
        f'unix_sock_dir = "{scratch / "sock"}"\nunix_sock_group = "root"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\nlog_outputs = "3:stderr"\n')


def _script(scratch: Path) -> str:
    mounts = [f"mount -t tmpfs nubis-lab-libvirt {d}" for d in _PRIVATE_DIRS]
    mounts.append(f"mount --bind {scratch / 'etc'} /etc/libvirt")
    mounts += _users_mounts(scratch)
    # Under the reaper, the QEMU processes libvirtd orphans are reaped as soon as they end.
    daemon = shlex.join(reaper.argv(["libvirtd", "-f", str(scratch / "libvirtd.conf")]))
    return " && ".join([*mounts, f"exec {daemon}"])


def _users_mounts(scratch: Path) -> list[str]:
    """A passwd and group with libvirt's QEMU user and groups, where the machine lacks them."""
    try:
        pwd.getpwnam(_QEMU_USER)
        user_missing = False
    except KeyError:
        user_missing = True
    groups = []
    for name in _GROUPS:
        try:
            grp.getgrnam(name)
        except KeyError:
            groups.append(name)
    if not user_missing and not groups:
        return []
    scratch.mkdir(parents=True, exist_ok=True)
    passwd, group = scratch / "passwd", scratch / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + (
        f"{_QEMU_USER}:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n" if user_missing
        else ""))
    group.write_text(Path("/etc/group").read_text()
                     + "".join(f"{name}:x:{_GROUPS[name]}:\n" for name in groups))
    return [f"mount --bind {passwd} /etc/passwd", f"mount --bind {group} /etc/group"]


def accelerator(image: Path, linux: tuple[Path, Path] | None = None) -> str:
    """KVM if QEMU really boots `image` (a disk printing a marker on COM1) under KVM and, when
    `linux` (a kernel and initrd: the nubis guest's) is given, that Linux up to its marker
    too; else TCG. A host's KVM may run the boot sector yet hang a Linux kernel silently."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return TCG
    # `-cpu host`: the guests' CPU under KVM is libvirt's host-model, and a host whose
    # KVM cannot set that CPU's MSRs fails here as it would at every guest's start.
    drive = ["-drive", f"file={image},format=qcow2,if=ide,snapshot=on"]
    if not _boots_under_kvm(drive, _PROBE_MARKER, 32):
        return TCG
    if linux is not None:
        kernel, initrd = linux
        boot = ["-kernel", str(kernel), "-initrd", str(initrd), "-append",
                "console=ttyS0 quiet panic=-1", "-no-reboot"]
        if not _boots_under_kvm(boot, _LINUX_MARKER, 128):
            return TCG
    return KVM


def _boots_under_kvm(boot: list[str], marker: bytes, memory_mb: int) -> bool:
    """Whether QEMU under KVM, booting with `boot`, writes `marker` on COM1 in time."""
    argv = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-display", "none",
            "-nodefaults", "-no-user-config", "-m", str(memory_mb), "-serial", "stdio", *boot]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    give_up = time.monotonic() + _PROBE_TIMEOUT
    try:
        while marker not in seen and time.monotonic() < give_up and proc.poll() is None:
            chunk = proc.stdout.read(65536)
            if chunk:
                seen = seen[-4096:] + chunk
            else:
                time.sleep(0.05)
        with contextlib.suppress(OSError, TypeError):
            seen += proc.stdout.read() or b""  # what it wrote before it exited
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return marker in seen


def agent_env(state_dir: Path, node: str, accel: str) -> dict[str, str]:
    """What a qemu lab's agent is told beyond a test lab's: libvirtd, dataplane, accelerator."""
    return {
        "NUBIS_AGENT__LIBVIRT_URI": uri(state_dir),
        "NUBIS_AGENT__DATAPLANE": "kernel",
        "NUBIS_AGENT__DATAPLANE_NETNS": netns(state_dir),
        "NUBIS_AGENT__VIRT_TYPE": VIRT_TYPE[accel],
        "NUBIS_AGENT__TRAITS": json.dumps([ACCEL_TRAIT[accel]]),
        # Pools are per node in the one libvirtd; a name of its own keeps them apart.
        "NUBIS_AGENT__STORAGE_POOL": f"nubis-{node}",
        # Emulated guests booting take whatever CPU is left, never the control plane's or
        # that of libvirt starting the next guest (KVM guests are left alone).
        "NUBIS_AGENT__TCG_VCPU_SCHEDULER": "idle",
    }


def destroy_guests(state_dir: Path) -> None:
    """End every guest of the lab's libvirtd (QEMU outlives a stopped libvirtd).

    Through virsh: only the agent's driver speaks libvirt's API.
    """
    if shutil.which("virsh") is None:
        return
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        listed = subprocess.run(["virsh", "-c", uri(state_dir), "list", "--name"],
                                capture_output=True, text=True, timeout=15, check=False)
        for name in listed.stdout.split():
            subprocess.run(["virsh", "-c", uri(state_dir), "destroy", name],
                           capture_output=True, timeout=15, check=False)


def cleanup(state_dir: Path) -> None:
    """Delete the lab's namespaces (its own and those its dataplane made inside its scope)."""
    name = netns(state_dir)
    for namespace in _namespaces():
        if namespace == name or namespace.startswith(f"{name}."):
            _kill_netns_pids(namespace)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10,
                           check=False)


def _kill_netns_pids(namespace: str) -> None:
    """dnsmasq servers the dataplane left in the lab's namespace (an agent killed mid-way)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True,
                          timeout=10, check=False)
    for pid in done.stdout.split():
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid), 15)
    if done.stdout.strip():
        time.sleep(0.5)


def _namespaces() -> list[str]:
    done = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                          timeout=10, check=False)
    try:
        return [entry["name"] for entry in json.loads(done.stdout or "[]")]
    except (ValueError, KeyError, TypeError):
        return []
