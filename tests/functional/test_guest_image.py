"""The nubis guest, built from Debian's packages and booted under QEMU TCG by direct
kernel boot: on a tap in a private network namespace whose udhcpd gives it an address,
it says it is up and which address it got, answers ping and serves its page; a marker it
writes on its disk is read back by a second boot from the same disk file, which also
marks a disk hot-plugged while it runs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.client.lab import guest_image

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
GATEWAY = "192.0.2.1"  # TEST-NET-1, inside the test's own namespace only
BOOT_WAIT = 25.0


@pytest.fixture(scope="session")
def guest(request: pytest.FixtureRequest) -> guest_image.GuestImage:
    """Built once per cache dir (kept between runs while the package versions hold)."""
    return guest_image.build_guest(Path(request.config.cache.mkdir("nubis-guest")))


@dataclass
class Netns:
    """A private namespace with tap0 (GATEWAY/24) and udhcpd serving it."""

    name: str

    def run(self, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        # No proxy from the environment: the guest is reached directly inside the namespace.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, timeout=timeout, check=False, env=env)


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Netns]:
    if shutil.which("ip") is None or shutil.which("busybox") is None:
        pytest.fail("the guest test needs iproute2 and busybox on the host")
    ns = Netns(f"nubis-guest-{secrets.token_hex(4)}")
    _sh("ip", "netns", "add", ns.name)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        for argv in (("ip", "tuntap", "add", "dev", "tap0", "mode", "tap"),
                     ("ip", "addr", "add", f"{GATEWAY}/24", "dev", "tap0"),
                     ("ip", "link", "set", "tap0", "up"), ("ip", "link", "set", "lo", "up")):
            _sh("ip", "netns", "exec", ns.name, *argv)
        conf = tmp_path / "udhcpd.conf"
        conf.write_text(f"start 192.0.2.50\nend 192.0.2.60\ninterface tap0\n"
                        f"lease_file {tmp_path}/leases\npidfile {tmp_path}/udhcpd.pid\n"
                        "option subnet 255.255.255.0\nmax_leases 10\n")
        (tmp_path / "leases").touch()
        daemon = subprocess.Popen(["ip", "netns", "exec", ns.name, "busybox", "udhcpd", "-f",
                                   str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        yield ns
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait()
        subprocess.run(["ip", "netns", "del", ns.name], check=False, timeout=10)


class Boot:
    """One QEMU TCG run of the guest, its serial console in a file."""

    def __init__(self, guest: guest_image.GuestImage, console: Path, disk: Path,
                 netns: Netns | None, hostname: str) -> None:
        self.console = console
        self.qmp_path = console.with_suffix(".qmp")
        # With a namespace: eth0 on its tap, and eth1 on QEMU's own user network, kept
        # from reaching anything beyond QEMU (restrict=on); it only gives out a lease.
        nic = ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
               "-device", "virtio-net-pci,netdev=n0", "-netdev", "user,id=n1,restrict=on",
               "-device", "virtio-net-pci,netdev=n1"] if netns else []
        prefix = ["ip", "netns", "exec", netns.name] if netns else []
        self.started = time.monotonic()
        self.process = subprocess.Popen([
            *prefix, "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(guest.kernel),
            "-initrd", str(guest.initrd), "-append", f"{guest.cmdline} hostname={hostname}",
            "-serial", f"file:{console}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-drive", f"file={disk},format=raw,if=virtio", *nic],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + BOOT_WAIT
        while True:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            found = re.search(pattern, text)
            if found:
                return found
            assert self.process.poll() is None, f"qemu ended: {text[-2000:]}"
            assert time.monotonic() < deadline, f"no {pattern!r} in: {text[-2000:]}"
            time.sleep(0.2)

    def qmp(self, *commands: dict[str, object]) -> None:
        """Run QMP commands in order, each answered with "return" (not "error")."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(str(self.qmp_path))
            replies = conn.makefile("r")
            json.loads(replies.readline())  # the greeting
            for command in ({"execute": "qmp_capabilities"}, *commands):
                conn.sendall(json.dumps(command).encode() + b"\n")
                while "event" in (reply := json.loads(replies.readline())):
                    pass
                assert "return" in reply, (command, reply)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def boots() -> Iterator[list[Boot]]:
    made: list[Boot] = []
    yield made
    for boot in made:
        boot.stop()


@pytest.mark.timeout(90)
def test_the_guest_boots_gets_an_address_answers_and_keeps_its_disk_marker(
    guest: guest_image.GuestImage, netns: Netns, boots: list[Boot], tmp_path: Path,
) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as handle:
        handle.truncate(8 << 20)
    first = Boot(guest, tmp_path / "first.log", disk, netns, "probe-one")
    boots.append(first)
    first.wait_for(r"NUBIS-GUEST-UP probe-one\n")
    up_seconds = time.monotonic() - first.started
    address = first.wait_for(r"NUBIS-GUEST-IP eth0 (192\.0\.2\.\d+)/24\n").group(1)
    first.wait_for(r"NUBIS-GUEST-IP eth1 10\.0\.2\.15/24\n")  # every NIC asks DHCP
    mark = first.wait_for(r"NUBIS-GUEST-DISK vda wrote (probe-one [0-9a-f-]{36})\n").group(1)
    pinged = netns.run("busybox", "ping", "-c", "1", "-W", "3", address)
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr
    page = netns.run(sys.executable, "-c", "import sys, urllib.request; sys.stdout.write("
                     f"urllib.request.urlopen('http://{address}/', timeout=5).read().decode())")
    assert page.stdout == "nubis guest probe-one\n", page.stderr
    first.stop()

    second = Boot(guest, tmp_path / "second.log", disk, None, "probe-two")
    boots.append(second)
    second.wait_for(r"NUBIS-GUEST-UP probe-two\n")
    assert second.wait_for(r"NUBIS-GUEST-DISK vda (\w+) (.*)\n").groups() == ("found", mark)

    # A disk plugged into the running guest is seen within seconds, and marked.
    plugged = tmp_path / "plugged.raw"
    with plugged.open("wb") as handle:
        handle.truncate(4 << 20)
    second.qmp({"execute": "blockdev-add", "arguments": {
                    "node-name": "plugged", "driver": "raw",
                    "file": {"driver": "file", "filename": str(plugged)}}},
               {"execute": "device_add", "arguments": {
                   "driver": "virtio-blk-pci", "drive": "plugged", "id": "plugged0"}})
    second.wait_for(r"NUBIS-GUEST-DISK vdb wrote probe-two [0-9a-f-]{36}\n")
    print(f"guest up in {up_seconds:.1f}s under TCG; built in {guest.build_seconds}s")
