"""Benchmark: SelectDestinations + claim latency and throughput against a raw etcd baseline.

    python bench/scheduler_bench.py [--nodes 1000 10000] [--replicas 1 2] [--claims 2000]

Starts its own etcd (system binary, auto-compaction on), writes N node reports
straight into it (no agents), then drives scheduler replicas, each its own
process serving SchedulerService, with concurrent SelectDestinations calls.
Before that it measures the raw rate of etcd compare-and-put transactions on
the same machine, so the numbers can be read against what etcd itself gives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import server
from services.common.logging import configure_logging
from services.common.settings import EtcdSettings, ServiceEndpoint, Settings
from services.common.store import Store, Txn
from services.scheduler import keys, main, nodes, placement, policy, servicer

WRITE_BATCH = 500
# How long (in 0.2 s polls) a replica may take to register every node.
SETTLE_POLLS = 600
NODE_CAPACITY = scheduler_pb2.Resources(vcpus=64, memory_mb=262144, disk_gb=4000)
FLAVOR = scheduler_pb2.Resources(vcpus=1, memory_mb=512, disk_gb=1)


def bench_settings(etcd: str, prefix: str) -> Settings:
    return Settings(etcd=EtcdSettings(endpoints=[etcd], prefix=prefix), log_level="warning",
                    log_json=True)


# -- replica process ------------------------------------------------------------


async def serve_replica(etcd: str, prefix: str, port_file: Path) -> None:
    """One scheduler replica without authentication (the bench measures placement)."""
    settings = bench_settings(etcd, prefix)
    configure_logging(settings)
    store = await Store.connect([etcd], root=prefix)
    node_cache, informer = await main.start_cache(store, settings)
    places = placement.Placement(store, node_cache, settings.scheduling, random.Random())
    handler = servicer.SchedulerServicer(store, node_cache, places, settings.scheduling)
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0),
        [server.Registration(policy.SERVICE, handler,
                             scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server)],
        settings=settings,
    )
    registrar = asyncio.create_task(nodes.register_nodes(store, node_cache))
    # Steady state is measured: the one-off registration of every new node
    # (a settings record each) is done before the replica says it is ready.
    for _ in range(SETTLE_POLLS):
        if all(node_cache.settings(view.name) is not None for view in node_cache.views()):
            break
        await asyncio.sleep(0.2)
    await asyncio.to_thread(port_file.write_text, str(running.port))
    try:
        await running.wait_closed()
    finally:
        informer.cancel()
        registrar.cancel()


# -- driver ---------------------------------------------------------------------


@dataclass
class Result:
    label: str
    latencies_ms: list[float]
    seconds: float
    failures: int

    def row(self) -> dict[str, object]:
        ordered = sorted(self.latencies_ms)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0
        return {
            "case": self.label,
            "claims": len(ordered),
            "failures": self.failures,
            "p50_ms": round(statistics.median(ordered), 2) if ordered else 0.0,
            "p99_ms": round(p99, 2),
            "claims_per_s": round(len(ordered) / self.seconds, 1),
        }


async def write_nodes(store: Store, count: int) -> None:
    names = [f"bench-{index:05d}" for index in range(count)]
    for start in range(0, count, WRITE_BATCH):
        await asyncio.gather(*(
            store.create(keys.node_report(name), scheduler_pb2.NodeReport(
                name=name, capacity=NODE_CAPACITY, hypervisor_type="QEMU",
                availability_zone="nova", queue=f"node.{name}"))
            for name in names[start:start + WRITE_BATCH]))


async def etcd_txn_rate(store: Store, seconds: float, concurrency: int) -> Result:
    """Read-compare-write transactions (the shape of a claim) on distinct keys."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        key = f"bench/counter-{index}"

        async def body(txn: Txn) -> None:
            held = await txn.get(key, scheduler_pb2.NodeUsage)
            usage = scheduler_pb2.NodeUsage(name=key)
            if held is not None:
                usage.allocation_count = held.value.allocation_count + 1
            txn.put(key, usage)

        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await store.atomic(body)
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    return Result(f"raw etcd txn (c={concurrency})", latencies, time.perf_counter() - began, 0)


async def drive(addresses: list[str], claims: int, concurrency: int, label: str) -> Result:
    channels = [make_channel(address, policy=CallPolicy(max_attempts=1)) for address in addresses]
    stubs = [scheduler_pb2_grpc.SchedulerServiceStub(channel) for channel in channels]
    latencies: list[float] = []
    failures = 0
    codes: dict[str, int] = {}
    remaining = iter(range(claims))

    async def worker(index: int) -> None:
        nonlocal failures
        stub = stubs[index % len(stubs)]
        for _ in remaining:
            request = scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
                resources=FLAVOR, consumer_ids=[str(uuid.uuid4())]))
            began = time.perf_counter()
            try:
                await stub.SelectDestinations(request)
            except grpc.aio.AioRpcError as exc:
                failures += 1
                codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                continue
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - began
    for channel in channels:
        await channel.close()
    if codes:
        print(f"{label}: failed calls by code {codes}", file=sys.stderr)
    return Result(label, latencies, elapsed, failures)


def start_replica(etcd: str, prefix: str, workdir: Path, index: int) -> tuple[
    daemons.Daemon, str
]:
    port_file = workdir / f"replica-{prefix.strip('/')}-{index}.port"
    port_file.unlink(missing_ok=True)  # a stopped replica of an earlier case left its own
    argv = [sys.executable, __file__, "--serve-replica", "--etcd", etcd, "--prefix", prefix,
            "--port-file", str(port_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    daemon = daemons.spawn(f"scheduler-{index}", argv, workdir / f"replica-{index}.log", env=env)
    deadline = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text():
        if not daemon.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"replica failed to start: {daemon.log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    return daemon, f"127.0.0.1:{port_file.read_text()}"


async def run_case(etcd: str, workdir: Path, node_count: int, replica_counts: list[int],
                   claims: int, concurrencies: list[int]) -> list[Result]:
    prefix = f"/bench-{node_count}-{uuid.uuid4().hex[:6]}"
    store = await Store.connect([etcd], root=prefix)
    try:
        began = time.perf_counter()
        await write_nodes(store, node_count)
        print(f"wrote {node_count} nodes in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    finally:
        await store.close()
    results = []
    for replicas in replica_counts:
        started = [await asyncio.to_thread(start_replica, etcd, prefix, workdir, i)
                   for i in range(replicas)]
        addresses = [address for _, address in started]
        try:
            # A short warm-up so connection set-up is not in the numbers.
            await drive(addresses, 50, max(concurrencies), "warm-up")
            for concurrency in concurrencies:
                label = f"{node_count} nodes, {replicas} replica(s) (c={concurrency})"
                results.append(await drive(addresses, claims, concurrency, label))
        finally:
            for daemon, _ in started:
                daemon.stop()
    return results


async def run(args: argparse.Namespace) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="nubis-bench-") as scratch:
        workdir = Path(scratch)
        port, peer = daemons.free_port(), daemons.free_port()
        etcd_daemon = daemons.start_etcd(workdir / "etcd", port, peer)
        etcd = f"127.0.0.1:{port}"
        try:
            store = await Store.connect([etcd], root="/bench-raw")
            try:
                results = [await etcd_txn_rate(store, args.raw_seconds, concurrency)
                           for concurrency in args.concurrency]
            finally:
                await store.close()
            for node_count in args.nodes:
                results += await run_case(etcd, workdir, node_count, args.replicas,
                                          args.claims, args.concurrency)
            return results
        finally:
            etcd_daemon.stop()


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8],
                        help="calls in flight at once (one run per value)")
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--serve-replica", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--etcd", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_replica:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_replica(args.etcd, args.prefix, args.port_file))
        return
    rows = [result.row() for result in asyncio.run(run(args))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'case':<44} {'claims':>7} {'fail':>5} {'p50 ms':>8} {'p99 ms':>8} {'per s':>8}")
    for row in rows:
        print(f"{row['case']:<44} {row['claims']:>7} {row['failures']:>5} {row['p50_ms']:>8} "
              f"{row['p99_ms']:>8} {row['claims_per_s']:>8}")


if __name__ == "__main__":
    main_cli()
