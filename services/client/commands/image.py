"""`nubis image create|list|show|delete|download`: disk images, uploaded and downloaded in
1 MiB chunks, never held whole in memory, each checked against its sha256.

The chunks go through `services.client.image_stream`: never copied through
protobuf, hashed and written where they arrive.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from services.client import cli_context, image_stream
from services.client.channel import CallPolicy
from services.client.commands import service_call
from services.client.output import Output
from services.client.peers import stubs
from services.client.sdk import cloud as sdk_cloud
from services.common import errors, image_wire

T = TypeVar("T")
Stub = stubs.StorageClient
if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    RawStub = storage_service_pb2_grpc.StorageServiceAsyncStub
IM = image_pb2

CHUNK_BYTES = image_wire.CHUNK_BYTES
"""Bytes per UploadImage/DownloadImage message (the API's limit)."""
_QCOW2_MAGIC = b"QFI\xfb"

app = typer.Typer(help="Disk images: upload, list, download, delete.", no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'state=ACTIVE'.")]


# A download holds about this much unread however slow the disk it writes to. grpc's
# adaptive window otherwise grows with the stream: measured peak RSS of a download
# 85 MB (128 MiB image) and 141 MB (512 MiB); with this window 78 MB and 83 MB.
_DOWNLOAD_POLICY = CallPolicy(stream_window_bytes=2 * CHUNK_BYTES)


def call(ctx: typer.Context, action: Callable[[Stub], Awaitable[T]]) -> T:
    """Run one session of calls against nubis-storage (the SDK's client)."""
    return service_call.run(ctx, "storage", action)


def images(stub: Stub) -> service_call.Kind:
    """Images by id or name (the caller's, shared with it, public)."""
    async def lookup(filter_: str) -> list[Any]:
        reply = await stub.ListImages(IM.ListImagesRequest(filter=filter_, page_size=2))
        return list(reply.images)
    return service_call.Kind("image", lookup)


class DiskFormat(enum.StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"
    KERNEL = "kernel"
    RAMDISK = "ramdisk"


_FORMATS = {DiskFormat.QCOW2: IM.Image.DISK_FORMAT_QCOW2, DiskFormat.RAW: IM.Image.DISK_FORMAT_RAW,
            DiskFormat.KERNEL: IM.Image.DISK_FORMAT_KERNEL,
            DiskFormat.RAMDISK: IM.Image.DISK_FORMAT_RAMDISK}


def format_name(image: image_pb2.Image) -> str:
    return IM.Image.DiskFormat.Name(image.disk_format).removeprefix("DISK_FORMAT_").lower()


def _row(image: image_pb2.Image) -> dict[str, Any]:
    return service_call.flat(
        image, state=service_call.state_name(image), disk_format=format_name(image),
        visibility=IM.Image.Visibility.Name(image.visibility).removeprefix("VISIBILITY_").lower(),
        size_bytes=image.size_bytes, virtual_size_bytes=image.virtual_size_bytes)


def _show(ctx: typer.Context, image: image_pb2.Image) -> None:
    cli_context.get(ctx).output.record(_row(image), title="image")


def sniff_format(path: Path) -> DiskFormat:
    """qcow2 when the file starts with the qcow2 magic, else raw."""
    with path.open("rb") as handle:
        return DiskFormat.QCOW2 if handle.read(4) == _QCOW2_MAGIC else DiskFormat.RAW


def sha256_of(path: Path, on_chunk: Callable[[int], None] = lambda _: None) -> str:
    """Hex SHA-256 of a file, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            on_chunk(len(chunk))
    return digest.hexdigest()


@contextlib.contextmanager
def _progress(out: Output, what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar on a terminal (never in JSON mode or into a pipe); yields `advance(bytes)`."""
    if out.json or not out.console.is_terminal:
        yield lambda _: None
        return
    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=out.console, transient=True) as bar:
        task: TaskID = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


def upload_requests(image_id: str, path: Path, size: int, checksum: str,
                    advance: Callable[[int], None]) -> AsyncIterator[IM.UploadImageRequest]:
    """The UploadImage stream: the header, then the file in 1 MiB chunks as they are read
    (encoded already: for a stub of `image_stream.storage_stub`)."""
    return image_stream.upload_messages(IM.ImageUploadHeader(
        image_id=image_id, size_bytes=size, checksum_sha256=checksum), path, advance)


def _parse_properties(items: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not key=value")
        parsed[key] = value
    return parsed


@app.command("create")
def create(
    ctx: typer.Context, name: str,
    file: Annotated[Path, typer.Option("--file", exists=True, dir_okay=False, readable=True,
                                       help="The disk image to upload.")],
    disk_format: Annotated[DiskFormat | None, typer.Option(
        "--disk-format", help="Format of the file (default: qcow2 if it looks like one, "
        "else raw); the service checks it against the bytes. kernel and ramdisk are the "
        "parts of a direct kernel boot.")] = None,
    kernel: Annotated[str, typer.Option("--kernel", help="Kernel image (id or name, format "
                                        "kernel) guests booted from this image start.")] = "",
    ramdisk: Annotated[str, typer.Option("--ramdisk", help="Ramdisk (initrd) image, with "
                                         "--kernel.")] = "",
    cmdline: Annotated[str, typer.Option("--cmdline", help="Kernel command line, with "
                                         "--kernel.")] = "",
    public: Annotated[bool, typer.Option("--public/--private",
                                         help="Visible to every project (admin).")] = False,
    protected: Annotated[bool, typer.Option("--protected", help="Refuse deletes.")] = False,
    min_disk: Annotated[int, typer.Option("--min-disk", min=0, help="GiB.")] = 0,
    min_ram: Annotated[int, typer.Option("--min-ram", min=0, help="MiB.")] = 0,
    prop: Annotated[list[str] | None, typer.Option(
        "--property", help="key=value guest hint (repeat), e.g. os_distro=debian.")] = None,
) -> None:
    """Create an image and upload FILE into it (its sha256 is computed first and verified).

    If the upload fails, the image record made for it is deleted again.
    """
    out = cli_context.get(ctx).output
    size = file.stat().st_size
    fmt = disk_format or sniff_format(file)
    with _progress(out, "checksum", size) as advance:
        checksum = sha256_of(file, advance)

    async def run(cloud: sdk_cloud.Cloud) -> image_pb2.Image:
        s = cloud.storage
        image = IM.Image(meta=resource_pb2.ResourceMeta(name=name), disk_format=_FORMATS[fmt],
                        visibility=IM.Image.VISIBILITY_PUBLIC if public
                        else IM.Image.VISIBILITY_PRIVATE, protected=protected,
                        min_disk_gb=min_disk, min_ram_mb=min_ram,
                        properties=_parse_properties(prop or []))
        kinds = images(s)
        image.kernel_image_id = await kinds.id_of(kernel)
        image.ramdisk_image_id = await kinds.id_of(ramdisk)
        image.kernel_cmdline = cmdline
        created = await s.CreateImage(IM.CreateImageRequest(
            image=image, request_id=service_call.request_id()))
        try:
            # A raw stub: UploadImage is a client stream, which the typed clients do not
            # declare (no service uploads), sent as pre-encoded chunks with a progress bar.
            raw: RawStub = await service_call.raw_stub(cloud, "storage",
                                                       image_stream.storage_stub)
            with _progress(out, "upload", size) as advance:
                stream = upload_requests(created.meta.id, file, size, checksum, advance)
                uploaded: image_pb2.Image = await raw.UploadImage(stream)
        except BaseException:
            # One command made the record for these bytes: a refused or broken upload
            # leaves no empty image behind (best effort; the upload's error is the news).
            with contextlib.suppress(errors.NubisError):
                await s.DeleteImage(IM.DeleteImageRequest(id=created.meta.id))
            raise
        return uploaded

    _show(ctx, service_call.with_cloud(ctx, run))


@app.command("list")
def list_images(ctx: typer.Context, all_projects: AllProjects = False,
                filter_: Filter = "") -> None:
    """List the images you can see: your project's, shared with it, public."""
    async def run(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListImages(IM.ListImagesRequest(
                all_projects=all_projects, filter=filter_, page_token=token,
                page_size=service_call.PAGE_SIZE))
            return list(reply.images), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table(
        [_row(image) for image in call(ctx, run)],
        ["id", "name", "state", "disk_format", "size_bytes", "visibility"])


@app.command("show")
def show(ctx: typer.Context, image: str) -> None:
    """Show one image (id or name)."""
    async def run(s: Stub) -> image_pb2.Image:
        return await s.GetImage(IM.GetImageRequest(id=await images(s).id_of(image)))
    _show(ctx, call(ctx, run))


@app.command("delete")
def delete(ctx: typer.Context, image: str) -> None:
    """Delete an image and its bytes (refused while it is protected or in use)."""
    async def run(s: Stub) -> None:
        await s.DeleteImage(IM.DeleteImageRequest(id=await images(s).id_of(image)))
    call(ctx, run)
    cli_context.get(ctx).output.note(f"image {image} deleted")


@app.command("download")
def download(
    ctx: typer.Context, image: str,
    file: Annotated[Path | None, typer.Option(
        "--file", dir_okay=False, help="Where to write it (default: ./<name>.<format>).")] = None,
) -> None:
    """Download an image's bytes; the file is kept only if its sha256 matches the image's."""
    out = cli_context.get(ctx).output

    async def run(cloud: sdk_cloud.Cloud) -> dict[str, Any]:
        image_id = await images(cloud.storage).id_of(image)
        # A raw stub: the download's channel has its own small flow-control window
        # (_DOWNLOAD_POLICY), and the whole image may take longer than the typed
        # DownloadImage's deadline (made for a node's fetch task).
        raw: RawStub = await service_call.raw_stub(cloud, "storage", image_stream.storage_stub,
                                                   _DOWNLOAD_POLICY)
        stream = raw.DownloadImage(IM.DownloadImageRequest(id=image_id))
        first = await stream.read()
        if not isinstance(first, IM.DownloadImageResponse) or not first.HasField("image"):
            raise errors.Unavailable("the download stream did not start with the image record",
                                     reason="nubis.cli.bad_stream")
        record = first.image
        target = file or Path(f"{record.meta.name or record.meta.id}.{format_name(record)}")
        with _progress(out, "download", record.size_bytes) as advance:
            size = await _write_verified(stream, target, record.checksum_sha256,
                                         advance)
        return {"id": record.meta.id, "name": record.meta.name, "file": str(target),
                "size_bytes": size, "checksum_sha256": record.checksum_sha256}

    out.record(service_call.with_cloud(ctx, run), title="downloaded")


async def _write_verified(parts: AsyncIterable[Any], target: Path, expected: str,
                          advance: Callable[[int], None]) -> int:
    """Write the chunks of the messages to `target` through a .part file; returns the size.

    The .part file takes the name `target` only when the stream ended and its
    sha256 is `expected`; any failure removes it, so a half or corrupt
    download never looks like a whole one.
    """
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as handle:
            size, digest = await image_stream.write_chunks(parts, handle.fileno(), advance)
        if digest != expected:
            raise errors.FailedPrecondition(
                f"the downloaded bytes have sha256 {digest}, the image says "
                f"{expected}; nothing was kept", reason="nubis.cli.checksum_mismatch")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size
