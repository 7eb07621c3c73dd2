"""`nubis lab up --driver qemu`: a real guest through a lab of its own libvirtd, and nothing left.

The lab runs one node under a lab-private libvirtd; the node says how its
guests run (TCG here, KVM where a probe guest boots under it); a server boots,
its console shows the guest's output, libvirt agrees with nubis across stop
and start, delete leaves no domain, disk file or tap; `nubis server create
demo --wait`, with no other flag, boots the nubis guest (built and registered
by every qemu lab, and the lab's default image) with the lab's default flavor,
network and security group, and `nubis server console-log demo` shows it up
and the address nubis gave its port; and `lab down` leaves no libvirtd, guest
or namespace of the lab.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.client.lab import qemu, state
from services.common import network_devices
from tests.e2e.lab_cli import run_cli

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(300)]
_DOMSTATE = {"ACTIVE": "running", "STOPPED": "shut off"}


@pytest.fixture
def qemu_lab_dir() -> Iterator[Path]:
    """A short state dir (the libvirt socket lives in it), taken down even if the test fails."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    path = Path(tempfile.mkdtemp(prefix="nubis-qlab-")) / "lab"
    yield path
    run_cli("lab", "down", "--state-dir", str(path), "--grace", "3")
    shutil.rmtree(path.parent, ignore_errors=True)


def _missing() -> str:
    try:
        qemu.preflight()
    except Exception as exc:  # any refusal is a reason to skip
        return str(exc)
    return ""


def _cli(lab: Path, *args: str, timeout: float = 90.0) -> str:
    done = run_cli(*args, env={"NUBIS_LAB_DIR": str(lab)}, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
    return done.stdout


def _json(lab: Path, *args: str) -> Any:
    return json.loads(_cli(lab, "-o", "json", *args))


def _virsh(lab: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", qemu.uri(lab), *args], capture_output=True,
                          text=True, timeout=30, check=False)


def _links(lab: Path) -> str:
    return subprocess.run(["ip", "-n", qemu.netns(lab), "-br", "link"], capture_output=True,
                          text=True, timeout=10, check=False).stdout


def _eventually(check: Any, what: str, timeout: float = 20.0) -> None:
    give_up = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < give_up, what
        time.sleep(0.3)


def _agrees(lab: Path, server: dict[str, Any]) -> None:
    """`virsh domstate` says what `nubis server show` says."""
    shown = _json(lab, "server", "show", "hello")
    assert shown["state"] == server["state"]
    domstate = _virsh(lab, "domstate", shown["domain_name"]).stdout.strip()
    assert domstate == _DOMSTATE[shown["state"]], (shown["state"], domstate)


def _demo_says_its_address(lab: Path) -> bool:
    """`nubis server create demo --wait` and nothing else: the lab's defaults boot the nubis
    guest, whose console (`nubis server console-log demo`) says it is up and its address.
    False where the lab could not build the guest (it said so and went on)."""
    images = {image["name"] for image in _json(lab, "image", "list")}
    if "nubis-guest" not in images:
        return False
    asked = time.monotonic()
    made = _cli(lab, "server", "create", "demo", "--wait")
    active = time.monotonic() - asked
    assert "--flavor m1.tiny --image nubis-guest --network private" in made, made
    shown = _json(lab, "server", "show", "demo")
    assert shown["state"] == "ACTIVE", shown
    addresses = shown["addresses"]
    first = addresses[0] if isinstance(addresses, list) else addresses
    address = str(first).split("=", 1)[1]
    assert address.startswith("10.0.0."), address  # the lab's private network
    _eventually(lambda: f"NUBIS-GUEST-IP eth0 {address}/" in _cli(lab, "server", "console-log",
                                                                  "demo"),
                f"the guest does not say its address {address}", timeout=60)
    console = _cli(lab, "server", "console-log", "demo")
    assert "NUBIS-GUEST-UP " in console, console
    print(f"server create demo --wait: ACTIVE in {active:.1f} s, its address on the console "
          f"{time.monotonic() - asked:.1f} s after the command")
    _cli(lab, "server", "delete", "demo", "--wait")
    return True


def test_qemu_lab_boots_a_guest_and_leaves_nothing(qemu_lab_dir: Path, base_port: int) -> None:
    lab = qemu_lab_dir
    up = run_cli("lab", "up", "--driver", "qemu", "--state-dir", str(lab), "--base-port",
                 str(base_port), timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    node = _json(lab, "node", "show", "node-1")
    assert node["hypervisor_type"] == "QEMU" and node["dataplane"] == "kernel"
    assert qemu.ACCEL_TRAIT[qemu.TCG] in node["traits"] or qemu.ACCEL_TRAIT[qemu.KVM] in \
        node["traits"]

    server = _json(lab, "server", "create", "hello", "--flavor", "m1.tiny", "--image",
                   "lab-hello", "--network", "private", "--wait")
    assert server["state"] == "ACTIVE", server
    _eventually(lambda: "nubis lab guest: booted" in _cli(lab, "server", "console-log", "hello"),
                "the guest's output is not on its console")
    tap = network_devices.tap(server["port_ids"][0])
    assert tap in _links(lab)
    _agrees(lab, {"state": "ACTIVE"})
    _cli(lab, "server", "stop", "hello", "--wait")
    _agrees(lab, {"state": "STOPPED"})
    _cli(lab, "server", "start", "hello", "--wait")
    _agrees(lab, {"state": "ACTIVE"})

    disk = lab / "data" / "pools" / "node-1" / f"volume-{server['root_volume_id']}"
    assert disk.is_file()
    _cli(lab, "server", "delete", "hello", "--wait")
    assert _virsh(lab, "domstate", server["domain_name"]).returncode != 0  # no such domain
    _eventually(lambda: not disk.exists(), f"{disk} outlived its server")
    assert tap not in _links(lab)

    demo_booted = _demo_says_its_address(lab)
    recorded = state.load(lab)
    assert recorded is not None
    libvirtd = next(p for p in recorded.processes if p.name == qemu.LIBVIRTD)
    assert libvirtd.is_running()
    down = run_cli("lab", "down", "--state-dir", str(lab), "--grace", "3")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not libvirtd.is_running()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=10, check=False).stdout
    assert qemu.netns(lab) not in namespaces
    if not demo_booted:
        pytest.skip("the lab could not build the nubis guest here: no demo of it")
