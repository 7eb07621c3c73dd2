"""Image cache benchmark: a node's agent fetching an image from nubis-storage, next to `cp`.

Starts its own etcd and Redis, identity in this process (with the service
user), nubis-storage and one `nubis-agent` (libvirt test driver) as
subprocesses, uploads one image, then in each round (alternating which goes
first) times `cp` of the image file beside it and a `storage.fetch_image`
task sent to the agent: DownloadImage streamed through the service client,
hashed, written and fsynced into the agent's cache, added to its pool; and a
bare DownloadImage from this process to a file (hashed, fsynced), which is
what the fetch costs at least. The cached copy is deleted after each round,
so every fetch downloads; a fetch of an image already cached (the checksum
marker) is timed too. Goals: a fetch at >= 0.5 of `cp`'s throughput (the
issue's goal for moving image bytes), and at >= 0.8 of the bare download's
(the agent adds little to the stream). Usage:
``python bench/image_cache_bench.py [--size-mib N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc
from pydantic import SecretStr

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import logging as nubis_logging
from services.common import server, tasks
from services.common.settings import (
    AuthSettings,
    EtcdSettings,
    ServiceAuthSettings,
    ServiceEndpoint,
    load_settings,
)
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.identity import bootstrap
from services.identity import main as identity_main

MIB = 1 << 20
PASSWORD = "bench-admin-password"
SERVICE_PASSWORD = "bench-service-password"
PREFIX = "/bench-cache"
NODE = "bench-cache-node"
TARGET_RATIO = 0.5
"""Fetch throughput over `cp`'s, same file, same disk."""
TARGET_OVERHEAD_RATIO = 0.8
"""Fetch throughput over a bare DownloadImage's to a file."""


def _make_file(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    block = os.urandom(MIB)
    with path.open("wb") as file:
        for _ in range(size // MIB):
            file.write(block)
            hasher.update(block)
    return hasher.hexdigest()


def _cp(source: Path, target: Path) -> float:
    started = time.perf_counter()
    shutil.copyfile(source, target)
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def _chunks(image_id: str, source: Path, size: int,
            checksum: str) -> Iterator[image_pb2.UploadImageRequest]:
    yield image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
        image_id=image_id, size_bytes=size, checksum_sha256=checksum))
    with source.open("rb") as file:
        while block := file.read(MIB):
            yield image_pb2.UploadImageRequest(chunk=block)


def _env(etcd: str, redis_url: str, identity_port: int, **extra: str) -> dict[str, str]:
    return {**os.environ, "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd]),
            "NUBIS_ETCD__PREFIX": PREFIX, "NUBIS_REDIS_URL": redis_url,
            "NUBIS_IDENTITY__HOST": "127.0.0.1", "NUBIS_IDENTITY__PORT": str(identity_port),
            "NUBIS_SERVICE_AUTH__PASSWORD": SERVICE_PASSWORD, "NUBIS_LOG_LEVEL": "warning",
            "NUBIS_LOG_JSON": "false", **extra}


async def run(args: argparse.Namespace, workdir: Path, etcd: str, redis_url: str) -> bool:
    identity_port = daemons.free_port()
    settings = load_settings(etcd=EtcdSettings(endpoints=[etcd], prefix=PREFIX),
                             identity=ServiceEndpoint(host="127.0.0.1", port=identity_port),
                             auth=AuthSettings(hash_time_cost=1, hash_memory_kib=8192),
                             service_auth=ServiceAuthSettings(
                                 password=SecretStr(SERVICE_PASSWORD)))
    nubis_logging.configure_logging(load_settings(log_level="warning", log_json=False))
    store = await Store.connect([etcd], root=PREFIX)
    await bootstrap.ensure_admin(store, settings.auth, PASSWORD)
    await bootstrap.ensure_service_user(store, settings.auth, settings.service_auth,
                                        SERVICE_PASSWORD)
    parts = await identity_main.build(store, settings)
    for job in parts.background:
        if asyncio.iscoroutine(job):
            job.close()  # clients are given identity's address
    identity = await server.start(settings.identity, parts.registrations, settings=settings,
                                  authenticator=parts.authenticator,
                                  public_methods=parts.public_methods)
    storage_port = daemons.free_port()
    storage = daemons.spawn(
        "storage", [sys.executable, "-m", "services.storage.main"], workdir / "storage.log",
        env=_env(etcd, redis_url, identity_port, NUBIS_STORAGE__PORT=str(storage_port),
                 NUBIS_STORAGE__HOST="127.0.0.1", NUBIS_STORAGE__METRICS_PORT="0",
                 NUBIS_STORAGE__IMAGE_DIR=str(workdir / "images")))
    agent = daemons.spawn(
        "agent", [sys.executable, "-m", "services.agent.main", "--node-name", NODE],
        workdir / "agent.log",
        env=_env(etcd, redis_url, identity_port,
                 NUBIS_AGENT__STORAGE_POOL_PATH=str(workdir / "node" / "pool"),
                 NUBIS_AGENT__IMAGE_CACHE_PATH=str(workdir / "node" / "cache")))
    sender = await TaskSender.connect(SenderConfig(broker_url=redis_url, result_url=redis_url))
    channel = make_channel(f"127.0.0.1:{storage_port}", policy=CallPolicy(max_attempts=1,
                                                                          timeout=600))
    try:
        daemons.wait_for_port("127.0.0.1", storage_port, 30, storage.proc, storage.log_path)
        await sender.send(NODE, tasks.PING, tasks_pb2.PingRequest(),
                          operation_id=tasks.new_operation_id(), deadline=60)
        return await _rounds(args, workdir, sender, channel, settings.auth.admin_user,
                             settings.auth.admin_project, identity.address)
    finally:
        await channel.close()
        await sender.close()
        agent.stop()
        storage.stop()
        await identity.stop(0)
        for callback in parts.on_stop:
            await callback()
        await store.close()


async def _rounds(args: argparse.Namespace, workdir: Path, sender: TaskSender,
                  channel: grpc.aio.Channel, user: str, project: str,
                  identity_address: str) -> bool:
    identity_channel = make_channel(identity_address)
    login = await identity_pb2_grpc.IdentityServiceStub(identity_channel).Authenticate(
        identity_pb2.AuthenticateRequest(username=user, password=PASSWORD, project=project))
    await identity_channel.close()
    metadata = (("authorization", f"Bearer {login.token}"),)
    stub = storage_service_pb2_grpc.StorageServiceStub(channel)
    size: int = args.size_mib * MIB
    source = workdir / "image.raw"
    checksum = _make_file(source, size)
    image = await stub.CreateImage(image_pb2.CreateImageRequest(image=image_pb2.Image(
        meta=resource_pb2.ResourceMeta(name="bench"),
        disk_format=image_pb2.Image.DISK_FORMAT_RAW)), metadata=metadata)
    await stub.UploadImage(_chunks(image.meta.id, source, size, checksum), metadata=metadata)
    request = tasks_pb2.FetchImageRequest(image=tasks_pb2.CachedImageSource(
        image_id=image.meta.id, size_bytes=size, sha256=checksum, disk_format="raw"))
    forget = tasks_pb2.DeleteVolumeRequest(name=f"image-{image.meta.id}")

    async def download() -> float:
        started = time.perf_counter()
        hasher = hashlib.sha256()
        target = workdir / "down.raw"
        with target.open("wb") as out:
            async for part in stub.DownloadImage(image_pb2.DownloadImageRequest(
                    id=image.meta.id), metadata=metadata):
                if part.WhichOneof("part") == "chunk":
                    hasher.update(part.chunk)
                    out.write(part.chunk)
            out.flush()
            os.fsync(out.fileno())
        elapsed = time.perf_counter() - started
        target.unlink()
        assert hasher.hexdigest() == checksum
        return elapsed

    async def fetch() -> tuple[float, bool]:
        started = time.perf_counter()
        reply = await sender.send(NODE, tasks.FETCH_IMAGE, request,
                                  operation_id=tasks.new_operation_id())
        return time.perf_counter() - started, reply.changed

    cps: list[float] = []
    fetches: list[float] = []
    hits: list[float] = []
    downloads: list[float] = []
    for round_index in range(args.rounds):
        if round_index % 2:
            elapsed, changed = await fetch()
            cps.append(_cp(source, workdir / "copy.raw"))
        else:
            cps.append(_cp(source, workdir / "copy.raw"))
            elapsed, changed = await fetch()
        assert changed, "the fetch found the image cached"
        fetches.append(elapsed)
        downloads.append(await download())
        hit, changed = await fetch()
        assert not changed
        hits.append(hit)
        await sender.send(NODE, tasks.DELETE_VOLUME, forget,
                          operation_id=tasks.new_operation_id())
        print(f"round {round_index + 1}: cp {size / MIB / cps[-1]:7.0f} MiB/s  fetch "
              f"{size / MIB / elapsed:7.0f} MiB/s  bare download "
              f"{size / MIB / downloads[-1]:7.0f} MiB/s  cached fetch {hit * 1000:6.1f} ms",
              flush=True)
    cp_rate = size / MIB / statistics.median(cps)
    fetch_rate = size / MIB / statistics.median(fetches)
    download_rate = size / MIB / statistics.median(downloads)
    print(f"{args.size_mib} MiB image, {args.rounds} rounds (medians): cp {cp_rate:.0f} MiB/s, "
          f"fetch {fetch_rate:.0f} MiB/s (ratio to cp {fetch_rate / cp_rate:.2f}, to the bare "
          f"download {fetch_rate / download_rate:.2f}), bare download {download_rate:.0f} "
          f"MiB/s, cached fetch {statistics.median(hits) * 1000:.1f} ms")
    print(f"targets: ratio to cp >= {TARGET_RATIO}, to the bare download >= "
          f"{TARGET_OVERHEAD_RATIO}")
    return (fetch_rate / cp_rate >= TARGET_RATIO
            and fetch_rate / download_rate >= TARGET_OVERHEAD_RATIO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="", help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as scratch:
        workdir = Path(scratch)
        etcd_port, peer, redis_port = daemons.free_port(), daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(workdir / "etcd", etcd_port, peer)
        redis = daemons.start_redis(workdir / "redis", redis_port)
        try:
            met: bool = asyncio.run(run(args, workdir, f"127.0.0.1:{etcd_port}",
                                  f"redis://127.0.0.1:{redis_port}/0"))
        finally:
            redis.stop()
            etcd.stop()
    print("targets met" if met else "targets NOT met")


if __name__ == "__main__":
    main()
