"""Image benchmark: a 512 MiB upload and download through gRPC next to `cp` on the same disk.

Starts its own etcd and Redis, identity in this process and nubis-storage as a
subprocess (its image directory in the scratch directory, on the same disk as
the file), then, in each round (alternating which goes first): `cp` of the
image file to a copy beside it, an UploadImage of it (1 MiB chunks read from
the file; the service writes, hashes, fsyncs, runs `qemu-img info`, renames)
and a DownloadImage of it to a file beside it. Throughput ratio goal: upload
and download each >= 0.5 of `cp`'s. While each upload runs, the storage
process's RSS is sampled every 20 ms from /proc: its growth over the
service's RSS before the upload must stay < 64 MiB (the bytes are streamed,
never held). A bare gRPC stream of the same bytes (1 MiB messages, in this
process, nothing done with them) shows what Python gRPC carries on the
machine at that moment. ``cp`` does not fsync; an upload does by default (storage's
`sync_images`), so `cp` + fsync is shown too, and ``--no-sync`` runs storage
with uploads ending in the page cache, like `cp`. Usage:
``python bench/image_bench.py [--size-mib N] [--rounds R] [--no-sync]``.

Measured (three runs of the default 3 rounds, medians per run, load average
4-5 on 2 cores shared with other work): cp 2697-3593 MiB/s, cp + fsync
1249-1550 MiB/s; upload 324-438 MiB/s (0.11-0.15 of cp, 0.25-0.29 of cp +
fsync), download 174-287 MiB/s (0.06-0.10 of cp, 0.14-0.19 of cp + fsync);
bare gRPC stream 1201-1667 MiB/s; storage RSS growth 30-37 MiB. Storage CPU
1.8-2.1 ms/MiB per upload and 1.1-1.4 per download; the client's 2.9-3.4
ms/MiB per download is mostly the kernel writing the downloaded file into
page-cache pages. Reading them: `cp` here is copy_file_range, a copy inside
the kernel; even the bare stream, which does nothing with the bytes, stays
below half of it. Every number swings with the machine's load, and a copy
into the page cache costs about ten times more when its pages land on memory
the VM's host has taken back (the first copy after a pause) than on pages
freed just before, for `cp` and the transfers alike.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client import image_stream
from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import logging as nubis_logging
from services.common import server
from services.common.settings import AuthSettings, EtcdSettings, ServiceEndpoint, load_settings
from services.common.store import Store
from services.identity import bootstrap
from services.identity import main as identity_main

PASSWORD = "benchmark admin password"
MIB = 1 << 20
TARGET_RATIO = 0.5
"""Upload (and download) throughput over `cp`'s, same file, same disk, same run."""
TARGET_RSS_GROWTH_MIB = 64.0
"""Storage process RSS growth during one upload."""
T = TypeVar("T")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (every thread of it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_file(path: Path, size: int) -> str:
    """`size` bytes no disk format claims (probed raw), written once; their sha256."""
    hasher = hashlib.sha256()
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for index in range(size // MIB):
            piece = index.to_bytes(8, "little") + block[8:]
            hasher.update(piece)
            out.write(piece)
    return hasher.hexdigest()


async def _bare_grpc(size: int) -> float:
    """Seconds to stream `size` bytes in 1 MiB messages through a bare gRPC stream.

    Client and server in this process, nothing done with the bytes: what
    Python gRPC itself carries on this machine now, for reading the other numbers.
    """
    async def sink(requests: AsyncIterator[bytes], context: object) -> bytes:
        async for _ in requests:
            pass
        return b""

    bare = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * MIB)])
    bare.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Bare", {"Up": grpc.stream_unary_rpc_method_handler(sink)}),))
    port = bare.add_insecure_port("127.0.0.1:0")
    await bare.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    block = os.urandom(MIB)

    async def blocks() -> AsyncIterator[bytes]:
        for _ in range(size // MIB):
            yield block

    try:
        started = time.perf_counter()
        upload: Any = channel.stream_unary("/bench.Bare/Up")
        await upload(blocks())
        return time.perf_counter() - started
    finally:
        await channel.close()
        await bare.stop(0)


def _cp(source: Path, target: Path, *, fsync: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    if fsync:
        subprocess.run(["sync", str(target)], check=True)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


class Sampler:
    """The peak RSS of one process while a block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _rss_bytes(self.pid))
            await asyncio.sleep(0.02)

    def __enter__(self) -> Sampler:
        self.peak = _rss_bytes(self.pid)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, _rss_bytes(self.pid))


async def _upload(stub: storage_service_pb2_grpc.StorageServiceAsyncStub,
                  metadata: tuple[tuple[str, str], ...], source: Path, size: int,
                  checksum: str, pid: int) -> tuple[float, int, int, str]:
    """Seconds, RSS before, peak RSS during, and the image id."""
    made = await stub.CreateImage(image_pb2.CreateImageRequest(image=image_pb2.Image(
        meta=resource_pb2.ResourceMeta(name="bench"), disk_format=image_pb2.Image.DISK_FORMAT_RAW)),
        metadata=metadata)
    before = _rss_bytes(pid)
    with Sampler(pid) as sampler:
        started = time.perf_counter()
        done = await stub.UploadImage(image_stream.upload_messages(image_pb2.ImageUploadHeader(
            image_id=made.meta.id, size_bytes=size, checksum_sha256=checksum), source),
            metadata=metadata)
        elapsed = time.perf_counter() - started
    assert done.state == image_pb2.Image.ACTIVE and done.checksum_sha256 == checksum
    return elapsed, before, sampler.peak, made.meta.id


async def _download(stub: storage_service_pb2_grpc.StorageServiceAsyncStub,
                    metadata: tuple[tuple[str, str], ...], image_id: str, target: Path,
                    checksum: str) -> float:
    """Seconds to stream the image into a file, hashing it (as `nubis image download` does)."""
    started = time.perf_counter()
    with target.open("wb") as out:
        stream = stub.DownloadImage(image_pb2.DownloadImageRequest(id=image_id),
                                    metadata=metadata)
        first = await stream.read()
        assert isinstance(first, image_pb2.DownloadImageResponse) and first.HasField("image")
        size, digest = await image_stream.write_chunks(stream, out.fileno())
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(target.unlink)
    assert digest == checksum and size == first.image.size_bytes
    return elapsed


async def _costed(costs: list[tuple[float, float]], pid: int, work: Awaitable[T]) -> T:
    """`work`'s result; the CPU seconds it took storage and this process go to `costs`.

    On a shared machine CPU per MiB varies less than throughput does.
    """
    storage, client = _cpu_seconds(pid), time.process_time()
    result = await work
    costs.append((_cpu_seconds(pid) - storage, time.process_time() - client))
    return result


def _start_storage(workdir: Path, etcd: str, redis_url: str, port: int,
                   sync: bool) -> daemons.Daemon:
    env = {**os.environ, "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd]),
           "NUBIS_ETCD__PREFIX": "/bench", "NUBIS_REDIS_URL": redis_url,
           "NUBIS_STORAGE__PORT": str(port), "NUBIS_STORAGE__METRICS_PORT": "0",
           "NUBIS_STORAGE__IMAGE_DIR": str(workdir / "images"),
           "NUBIS_STORAGE__SYNC_IMAGES": "true" if sync else "false",
           "NUBIS_LOG_LEVEL": "warning", "NUBIS_LOG_JSON": "false"}
    storage = daemons.spawn("storage", [sys.executable, "-m", "services.storage.main"],
                            workdir / "storage.log", env=env)
    daemons.wait_for_port("127.0.0.1", port, 30, storage.proc, workdir / "storage.log")
    return storage


async def run(args: argparse.Namespace, workdir: Path, etcd: str, redis_url: str) -> bool:
    settings = load_settings(etcd=EtcdSettings(endpoints=[etcd], prefix="/bench"),
                             identity=ServiceEndpoint(port=0),
                             auth=AuthSettings(hash_time_cost=1, hash_memory_kib=8192))
    nubis_logging.configure_logging(load_settings(log_level="warning", log_json=False))
    store = await Store.connect([etcd], root="/bench")
    await bootstrap.ensure_admin(store, settings.auth, PASSWORD)
    parts = await identity_main.build(store, settings)
    for job in parts.background:
        if asyncio.iscoroutine(job):
            job.close()  # no catalog entry for a benchmark
    identity = await server.start(settings.identity, parts.registrations, settings=settings,
                                  authenticator=parts.authenticator,
                                  public_methods=parts.public_methods)
    port = daemons.free_port()
    storage = _start_storage(workdir, etcd, redis_url, port, not args.no_sync)
    print(f"storage pid {storage.pid}", flush=True)
    channel = make_channel(f"127.0.0.1:{port}", policy=CallPolicy(max_attempts=1, timeout=600))
    try:
        identity_channel = make_channel(identity.address)
        login = await identity_pb2_grpc.IdentityServiceStub(identity_channel).Authenticate(
            identity_pb2.AuthenticateRequest(username=settings.auth.admin_user,
                                             password=PASSWORD,
                                             project=settings.auth.admin_project))
        await identity_channel.close()
        metadata = (("authorization", f"Bearer {login.token}"),)
        stub = image_stream.storage_stub(channel)
        return await _rounds(args, workdir, stub, metadata, storage.pid)
    finally:
        await channel.close()
        storage.stop()
        await identity.stop(0)
        for callback in parts.on_stop:
            await callback()
        await store.close()


async def _rounds(args: argparse.Namespace, workdir: Path,
                  stub: storage_service_pb2_grpc.StorageServiceAsyncStub,
                  metadata: tuple[tuple[str, str], ...], pid: int) -> bool:
    size = args.size_mib * MIB
    source = workdir / "image.raw"
    checksum = _make_file(source, size)
    cps, synced, ups, downs, growths, bares = [], [], [], [], [], []
    costs: dict[str, list[tuple[float, float]]] = {"upload": [], "download": []}
    for round_index in range(args.rounds):
        if round_index % 2:
            up, before, peak, image_id = await _costed(
                costs["upload"], pid, _upload(stub, metadata, source, size, checksum, pid))
            cps.append(_cp(source, workdir / "copy.raw", fsync=False))
        else:
            cps.append(_cp(source, workdir / "copy.raw", fsync=False))
            up, before, peak, image_id = await _costed(
                costs["upload"], pid, _upload(stub, metadata, source, size, checksum, pid))
        synced.append(_cp(source, workdir / "copy.raw", fsync=True))
        bares.append(await _bare_grpc(size))
        downs.append(await _costed(costs["download"], pid, _download(
            stub, metadata, image_id, workdir / "down.raw", checksum)))
        ups.append(up)
        growths.append((peak - before) / MIB)
        await stub.DeleteImage(image_pb2.DeleteImageRequest(id=image_id), metadata=metadata)
        print(f"round {round_index + 1}: cp {size / MIB / cps[-1]:7.0f} MiB/s  "
              f"cp+fsync {size / MIB / synced[-1]:7.0f} MiB/s  upload {size / MIB / up:7.0f} "
              f"MiB/s  download {size / MIB / downs[-1]:7.0f} MiB/s  bare gRPC stream "
              f"{size / MIB / bares[-1]:5.0f} MiB/s  storage RSS "
              f"{before / MIB:.0f} -> peak {peak / MIB:.0f} MiB (+{growths[-1]:.1f})  "
              f"load {os.getloadavg()[0]:.2f}")
    cp_rate = size / MIB / statistics.median(cps)
    synced_rate = size / MIB / statistics.median(synced)
    up_rate = size / MIB / statistics.median(ups)
    down_rate = size / MIB / statistics.median(downs)
    growth = max(growths)
    print(f"{args.size_mib} MiB image, {args.rounds} rounds, sync_images="
          f"{not args.no_sync} (medians): cp {cp_rate:.0f} MiB/s, "
          f"cp+fsync {synced_rate:.0f} MiB/s, upload {up_rate:.0f} MiB/s (ratio "
          f"{up_rate / cp_rate:.2f}; {up_rate / synced_rate:.2f} of cp+fsync), download "
          f"{down_rate:.0f} MiB/s (ratio {down_rate / cp_rate:.2f}; "
          f"{down_rate / synced_rate:.2f} of cp+fsync), bare gRPC stream "
          f"{size / MIB / statistics.median(bares):.0f} MiB/s; storage RSS growth during upload "
          f"{growth:.1f} MiB (max)")
    for name, spent in costs.items():
        print(f"{name} CPU (medians, every thread): storage "
              f"{statistics.median(c[0] for c in spent) * 1000 / args.size_mib:.2f} ms/MiB, "
              f"client {statistics.median(c[1] for c in spent) * 1000 / args.size_mib:.2f} "
              "ms/MiB")
    print(f"targets: ratios >= {TARGET_RATIO}, RSS growth < {TARGET_RSS_GROWTH_MIB:.0f} MiB")
    return (up_rate / cp_rate >= TARGET_RATIO and down_rate / cp_rate >= TARGET_RATIO
            and growth < TARGET_RSS_GROWTH_MIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-sync", action="store_true",
                        help="run storage with sync_images=false (uploads end in the page cache)")
    parser.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as scratch:
        workdir = Path(scratch)
        etcd_port, peer, redis_port = daemons.free_port(), daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(workdir / "etcd", etcd_port, peer)
        redis = daemons.start_redis(workdir / "redis", redis_port)
        try:
            met = asyncio.run(run(args, workdir, f"127.0.0.1:{etcd_port}",
                                  f"redis://127.0.0.1:{redis_port}/0"))
        finally:
            redis.stop()
            etcd.stop()
    print("targets met" if met else "targets NOT met")


if __name__ == "__main__":
    main()
