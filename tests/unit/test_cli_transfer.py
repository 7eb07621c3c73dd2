"""How `nubis image create|download` move bytes: 1 MiB messages read as they are sent (and
encoded as protobuf would), a progress bar only for people at a terminal, and no half
download left under its name."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nubis.storage.v1 import image_pb2
from rich.console import Console

from services.client import channel, image_stream
from services.client.commands import image
from services.client.output import Output, OutputFormat
from services.common import errors


async def test_an_upload_is_a_header_then_one_mib_chunks_read_as_sent(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    data = os.urandom(2 * image.CHUNK_BYTES + 5)
    path.write_bytes(data)
    sent: list[int] = []
    stream = image.upload_requests("img-1", path, len(data), "abc", sent.append)
    header = await anext(stream)
    assert (header.header.image_id, header.header.size_bytes) == ("img-1", len(data))
    assert sent == []  # nothing read before the header went
    # Chunks go out encoded already, byte for byte what protobuf writes.
    encoded: list[object] = [message async for message in stream]
    assert all(isinstance(message, bytes) for message in encoded)
    chunks = [image_pb2.UploadImageRequest.FromString(message).chunk for message in encoded
              if isinstance(message, bytes)]
    assert [len(c) for c in chunks] == [image.CHUNK_BYTES, image.CHUNK_BYTES, 5]
    assert b"".join(chunks) == data and sum(sent) == len(data)
    assert image.sha256_of(path) == hashlib.sha256(data).hexdigest()


async def _chunks(*parts: bytes) -> AsyncIterator[object]:
    # As the download stream gives them after its record: views of the bytes received.
    for part in parts:
        yield image_stream.parse_download(image_pb2.DownloadImageResponse(
            chunk=part).SerializeToString())


async def test_a_download_keeps_its_name_only_when_the_checksum_matches(tmp_path: Path) -> None:
    target = tmp_path / "copy.raw"
    good = hashlib.sha256(b"abcdef").hexdigest()
    assert await image._write_verified(_chunks(b"abc", b"def"), target, good, lambda _: None) == 6
    assert target.read_bytes() == b"abcdef"
    other = tmp_path / "other.raw"
    with pytest.raises(errors.FailedPrecondition, match="nothing was kept"):
        await image._write_verified(_chunks(b"abc"), other, good, lambda _: None)
    assert os.listdir(tmp_path) == ["copy.raw"]  # neither other.raw nor other.raw.part


def _printer(format_: OutputFormat, terminal: bool) -> tuple[Output, io.StringIO]:
    sink = io.StringIO()
    console = Console(file=sink, force_terminal=terminal, width=100)
    return Output(format=format_, console=console), sink


@pytest.mark.parametrize(("format_", "terminal", "drawn"), [
    (OutputFormat.TABLE, True, True),
    (OutputFormat.TABLE, False, False),
    (OutputFormat.JSON, True, False),
])
def test_the_progress_bar_is_only_for_a_terminal_and_never_in_json(
    format_: OutputFormat, terminal: bool, drawn: bool,
) -> None:
    out, sink = _printer(format_, terminal)
    with image._progress(out, "upload", 4096) as advance:
        advance(4096)
    assert ("upload" in sink.getvalue()) is drawn


def test_a_download_channel_has_a_fixed_window() -> None:
    options = dict(channel.channel_options(image._DOWNLOAD_POLICY))
    assert options["grpc.http2.bdp_probe"] == 0
    assert options["grpc.http2.lookahead_bytes"] == 2 * image.CHUNK_BYTES
    assert "grpc.http2.bdp_probe" not in dict(channel.channel_options(channel.CallPolicy()))
