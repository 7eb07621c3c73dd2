"""The image cache's own rules: what a header says, when a cached image counts, resuming a part."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import image_cache
from services.common.settings import Settings

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


@needs_qemu_img
def test_a_qcow2_header_gives_its_virtual_size_and_any_backing_file(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "24M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(overlay)], check=True)
    assert image_cache.read_header(base) == image_cache.DiskHeader("qcow2", 24 << 20, False)
    assert image_cache.read_header(overlay).has_backing_file


def test_anything_else_is_raw_of_its_own_size(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096 + b"QFI\xfb")
    assert image_cache.read_header(raw) == image_cache.DiskHeader("raw", 4100, False)


def test_an_image_counts_as_cached_only_with_its_checksum_marker(tmp_path: Path) -> None:
    files = image_cache.ImageFiles(tmp_path, image_cache.Downloader(Settings()))
    data = b"bytes of an image"
    image = tasks_pb2.CachedImageSource(image_id="4b0a3c7e-2a41-4f7e-9d1e-2f7c9e0b5a11",
                                        size_bytes=len(data),
                                        sha256=hashlib.sha256(data).hexdigest())
    assert not files.marked(image)
    files.mark(image)
    assert files.marked(image)
    other = tasks_pb2.CachedImageSource(image_id=image.image_id, size_bytes=len(data),
                                        sha256=hashlib.sha256(b"other").hexdigest())
    assert not files.marked(other)
    files.file(image.image_id).write_bytes(data)
    assert files.verified_file(image) == files.file(image.image_id)
    files.file(image.image_id).write_bytes(data[:-1] + b"!")
    assert files.verified_file(image) is None
    files.forget(image.image_id)
    assert list(tmp_path.iterdir()) == []
