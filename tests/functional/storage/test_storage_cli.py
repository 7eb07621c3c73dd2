"""`nubis image|volume|pool ...` against real storage, scheduler and agents."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.functional.cli_runner import Nubis
from tests.functional.storage.volume_harness import NODES, VolumeCloud


@pytest.fixture
def nubis(cloud: VolumeCloud, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Nubis:
    """The CLI as the cloud admin."""
    token = dict(cloud.admin)["authorization"].removeprefix("Bearer ")
    return Nubis.configure(monkeypatch, capsys, tmp_path / "cli", token,
                           identity=cloud.identity.running.address,
                           storage=cloud.storage_address)


def _qcow2(path: Path, size: str = "1G") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    with path.open("r+b") as handle:  # some data past the header, so chunks carry bytes
        handle.seek(0, os.SEEK_END)
        handle.write(os.urandom(3 * 1024 * 1024 + 17))
    return path


async def test_image_round_trip_and_a_volume_made_from_it(nubis: Nubis, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(4096))
    error = await nubis.fails("image", "create", "not-qcow2", "--file", str(raw),
                              "--disk-format", "qcow2")
    assert error.startswith("error: INVALID_ARGUMENT")
    assert await nubis.json("image", "list", "--filter", "name=not-qcow2") == []  # not left

    (tmp_path / "vmlinuz").write_bytes(os.urandom(64 * 1024))
    kernel = await nubis.json("image", "create", "cli-kernel", "--file",
                              str(tmp_path / "vmlinuz"), "--disk-format", "kernel")
    booted = await nubis.json("image", "create", "cli-kernel-root", "--file", str(raw),
                              "--kernel", "cli-kernel", "--cmdline", "console=ttyS0")
    assert (booted["disk_format"], booted["kernel_image_id"], booted["kernel_cmdline"]) == (
        "raw", kernel["id"], "console=ttyS0")

    source = _qcow2(tmp_path / "disk.qcow2")
    made = await nubis.json("image", "create", "cli-disk", "--file", str(source))
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert (made["state"], made["disk_format"]) == ("ACTIVE", "qcow2")
    assert made["checksum_sha256"] == digest and int(made["size_bytes"]) == source.stat().st_size
    assert made["id"] in {i["id"] for i in await nubis.json("image", "list")}
    shown = await nubis.json("image", "show", "cli-disk")  # by name
    assert shown["id"] == made["id"]
    copy = tmp_path / "copy.qcow2"
    got = await nubis.json("image", "download", made["id"], "--file", str(copy))
    assert got["checksum_sha256"] == digest and copy.read_bytes() == source.read_bytes()
    assert not copy.with_name("copy.qcow2.part").exists()

    volume = await nubis.json("volume", "create", "cli-vol", "--size", "2", "--image",
                              "cli-disk", "--node", NODES[1], "--wait")
    assert (volume["state"], volume["size_gb"], volume["node"]) == ("AVAILABLE", 2, NODES[1])
    assert volume["source"] == f"image:{made['id']}"
    assert (await nubis.json("volume", "show", "cli-vol"))["id"] == volume["id"]
    grown = await nubis.json("volume", "extend", "cli-vol", "--size", "3", "--wait")
    assert (grown["state"], grown["size_gb"]) == ("AVAILABLE", 3)
    snap = await nubis.json("snapshot", "create", "cli-snap", "--volume", "cli-vol", "--wait")
    assert (snap["state"], snap["volume_id"]) == ("AVAILABLE", volume["id"])
    assert [s["id"] for s in await nubis.json("snapshot", "list")] == [snap["id"]]
    code, _, err = await nubis("snapshot", "delete", "cli-snap", "--wait")
    assert code == 0, err
    error = await nubis.fails("image", "delete", "cli-disk")
    assert "FAILED_PRECONDITION" in error and "nubis.image.in_use" in error
    code, _, err = await nubis("volume", "delete", "cli-vol", "--wait")
    assert code == 0, err
    assert volume["id"] not in {v["id"] for v in await nubis.json("volume", "list")}
    pools = await nubis.json("pool", "list")
    assert {p["node"] for p in pools} == set(NODES)
    first = pools[0]
    shown = await nubis.json("pool", "show", f"{first['node']}/{first['name']}")
    assert shown["id"] == first["id"] and float(shown["capacity_gib"]) > 0
    code, _, err = await nubis("image", "delete", made["id"])
    assert code == 0, err
    error = await nubis.fails("volume", "create", "v", "--size", "1", "--image", "cli-disk")
    assert error == "error: no image named 'cli-disk' (nubis.cli.no_such_name)"
