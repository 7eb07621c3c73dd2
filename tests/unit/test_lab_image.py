"""The image `nubis lab up` registers: a real qcow2 made locally, whose boot sector
really boots and says so on the serial console."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from services.client.lab import seed


def test_the_lab_image_is_a_one_gib_qcow2_made_once(tmp_path: Path) -> None:
    target = seed.make_image(tmp_path / "seed" / seed.IMAGE_FILE)
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(target)], check=True, capture_output=True,
        text=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
    assert target.stat().st_size < 1 << 20
    made = target.stat().st_mtime_ns
    assert seed.make_image(target) == target and target.stat().st_mtime_ns == made
    assert list(target.parent.iterdir()) == [target]  # no scratch left behind


@pytest.mark.qemu
def test_a_guest_booted_from_the_lab_image_prints_on_its_console(tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    image = seed.make_image(tmp_path / seed.IMAGE_FILE)
    console = tmp_path / "console.log"
    guest = subprocess.Popen([qemu, "-drive", f"file={image},format=qcow2,if=ide",
                              "-display", "none", "-serial", f"file:{console}", "-m", "32",
                              "-no-reboot", "-nodefaults"])
    try:
        deadline = time.monotonic() + 30
        while b"nubis lab guest: booted" not in (console.read_bytes()
                                                 if console.exists() else b""):
            assert time.monotonic() < deadline, "the guest printed nothing"
            time.sleep(0.2)
    finally:
        guest.kill()
        guest.wait()
