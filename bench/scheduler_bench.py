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
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import prometheus_client
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import metrics as common_metrics
from services.common import server
from services.common.logging import configure_logging
from services.common.settings import EtcdSettings, ServiceEndpoint, Settings
from services.common.store import Store, Txn
from services.scheduler import keys, main, nodes, placement, policy, servicer
from services.scheduler import metrics as scheduler_metrics

WRITE_BATCH = 500
# How long (in 0.2 s polls) a replica may take to register every node.
SETTLE_POLLS = 600
NODE_CAPACITY = scheduler_pb2.Resources(vcpus=64, memory_mb=262144, disk_gb=4000)
FLAVOR = scheduler_pb2.Resources(vcpus=1, memory_mb=512, disk_gb=1)


def bench_settings(etcd: str, prefix: str) -> Settings:
    return Settings(etcd=EtcdSettings(endpoints=[etcd], prefix=prefix), log_level="warning",
                    log_json=True)


# -- replica process ------------------------------------------------------------

# The loop is probed every LAG_TICK (rarely enough to cost nothing measurable);
# a wake-up later than LAG_STALL behind its timer counts as a stall.
LAG_TICK = 0.01
LAG_STALL = 0.005


class ReplicaProbes:
    """Where a replica's time goes: GC pauses and event-loop stalls, as counters."""

    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.gc_pauses = prometheus_client.Counter(
            "bench_gc_pauses", "Collections.", registry=registry)
        self.gc_seconds = prometheus_client.Counter(
            "bench_gc_pause_seconds", "Time in collections.", registry=registry)
        self.stalls = prometheus_client.Counter(
            "bench_loop_stalls", f"Loop wake-ups > {LAG_STALL * 1000:.0f} ms late.",
            registry=registry)
        self.stall_seconds = prometheus_client.Counter(
            "bench_loop_stall_seconds", "Lateness of those wake-ups.", registry=registry)
        self.gc_max = prometheus_client.Gauge(
            "bench_gc_pause_max_seconds", "Longest collection.", registry=registry)
        self.stall_max = prometheus_client.Gauge(
            "bench_loop_stall_max_seconds", "Longest stall.", registry=registry)
        self._gc_began = 0.0
        self._gc_longest = 0.0
        self._stall_longest = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
            return
        paused = time.perf_counter() - self._gc_began
        self.gc_pauses.inc()
        self.gc_seconds.inc(paused)
        self._gc_longest = max(self._gc_longest, paused)
        self.gc_max.set(self._gc_longest)

    async def sample_lag(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(LAG_TICK)
            late = time.perf_counter() - began - LAG_TICK
            if late > LAG_STALL:
                self.stalls.inc()
                self.stall_seconds.inc(late)
                self._stall_longest = max(self._stall_longest, late)
                self.stall_max.set(self._stall_longest)


async def serve_replica(etcd: str, prefix: str, port_file: Path) -> None:
    """One scheduler replica without authentication (the bench measures placement)."""
    settings = bench_settings(etcd, prefix)
    configure_logging(settings)
    store = await Store.connect([etcd], root=prefix)
    node_cache, informer = await main.start_cache(store, settings)
    registry = prometheus_client.CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    claim_metrics = scheduler_metrics.ClaimMetrics()
    claim_metrics.register(registry)
    probes = ReplicaProbes(registry)
    metrics_http = common_metrics.serve_http(registry, "127.0.0.1", 0)
    places = placement.Placement(store, node_cache, settings.scheduling, random.Random(),
                                 claim_metrics)
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
    sampler = asyncio.create_task(probes.sample_lag())
    await asyncio.to_thread(port_file.write_text, f"{running.port} {metrics_http.port}")
    try:
        await running.wait_closed()
    finally:
        informer.cancel()
        registrar.cancel()
        sampler.cancel()
        metrics_http.stop()


# -- driver ---------------------------------------------------------------------


@dataclass
class Result:
    label: str
    latencies_ms: list[float]
    seconds: float
    failures: int
    # What the processes did meanwhile (see Watch.finish); empty for the raw etcd case.
    where: dict[str, float] = field(default_factory=dict)

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
            **self.where,
        }


@dataclass
class Replica:
    daemon: daemons.Daemon
    address: str
    metrics_port: int


SCRAPED = ("nubis_scheduler_claims_total", "nubis_scheduler_claim_conflicts_total",
           "bench_gc_pauses_total", "bench_gc_pause_seconds_total",
           "bench_loop_stalls_total", "bench_loop_stall_seconds_total",
           "bench_gc_pause_max_seconds", "bench_loop_stall_max_seconds")


def scrape(port: int) -> dict[str, float]:
    """The SCRAPED counters of one replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = dict.fromkeys(SCRAPED, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Watch:
    """Counters and CPU time of every process around one driven run."""

    replicas: list[Replica]
    etcd_pid: int
    counters: list[dict[str, float]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)

    def _cpu_now(self) -> dict[str, float]:
        now = {"driver": cpu_seconds(os.getpid()), "etcd": cpu_seconds(self.etcd_pid)}
        now["replicas"] = sum(cpu_seconds(r.daemon.pid) for r in self.replicas)
        return now

    def start(self) -> None:
        self.counters = [scrape(r.metrics_port) for r in self.replicas]
        self.cpu = self._cpu_now()

    def finish(self, seconds: float, claims: int) -> dict[str, float]:
        """Per-run deltas: conflicts per claim, GC and loop stalls, CPU by process."""
        total = dict.fromkeys(SCRAPED, 0.0)
        for replica, before in zip(self.replicas, self.counters, strict=True):
            for name, value in scrape(replica.metrics_port).items():
                # Maxima are since the replica started (its warm-up included).
                total[name] = (max(total[name], value) if name.endswith("max_seconds")
                               else total[name] + value - before[name])
        cpu = {name: value - self.cpu[name] for name, value in self._cpu_now().items()}
        per_claim = max(1, claims)
        return {
            "conflicts": total["nubis_scheduler_claim_conflicts_total"],
            "conflicts_per_claim": round(
                total["nubis_scheduler_claim_conflicts_total"] / per_claim, 3),
            "gc_pauses": total["bench_gc_pauses_total"],
            "gc_ms": round(total["bench_gc_pause_seconds_total"] * 1000, 1),
            "loop_stalls": total["bench_loop_stalls_total"],
            "stall_ms": round(total["bench_loop_stall_seconds_total"] * 1000, 1),
            "gc_max_ms": round(total["bench_gc_pause_max_seconds"] * 1000, 1),
            "stall_max_ms": round(total["bench_loop_stall_max_seconds"] * 1000, 1),
            "replica_cpu_ms_per_claim": round(cpu["replicas"] * 1000 / per_claim, 2),
            "cores_busy": round(sum(cpu.values()) / seconds, 2),
            "driver_cores": round(cpu["driver"] / seconds, 2),
            "etcd_cores": round(cpu["etcd"] / seconds, 2),
            "replica_cores": round(cpu["replicas"] / seconds, 2),
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


async def drive(addresses: list[str], claims: int, concurrency: int, label: str,
                watch: Watch | None = None) -> Result:
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

    if watch is not None:
        await asyncio.to_thread(watch.start)
    began = time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - began
    where = {}
    if watch is not None:
        where = await asyncio.to_thread(watch.finish, elapsed, len(latencies))
    for channel in channels:
        await channel.close()
    if codes:
        print(f"{label}: failed calls by code {codes}", file=sys.stderr)
    return Result(label, latencies, elapsed, failures, where)


def start_replica(etcd: str, prefix: str, workdir: Path, index: int) -> Replica:
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
    port, metrics_port = port_file.read_text().split()
    return Replica(daemon, f"127.0.0.1:{port}", int(metrics_port))


async def run_case(etcd: str, etcd_pid: int, workdir: Path, node_count: int,
                   replica_counts: list[int], claims: int,
                   concurrencies: list[int]) -> list[Result]:
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
        addresses = [replica.address for replica in started]
        try:
            # A short warm-up so connection set-up is not in the numbers.
            await drive(addresses, 50, max(concurrencies), "warm-up")
            for concurrency in concurrencies:
                label = f"{node_count} nodes, {replicas} replica(s) (c={concurrency})"
                results.append(await drive(addresses, claims, concurrency, label,
                                           Watch(started, etcd_pid)))
        finally:
            for replica in started:
                replica.daemon.stop()
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
                results += await run_case(etcd, etcd_daemon.pid, workdir, node_count,
                                          args.replicas,
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
    print("\nwhere the time went (replicas summed; cores of all processes, of which "
          f"{os.cpu_count()} exist)")
    print(f"{'case':<44} {'confl/claim':>11} {'gc n/ms/max':>15} {'stalls n/ms/max':>17} "
          f"{'cpu ms/claim':>12} {'cores drv/etcd/rep':>20}")
    for row in rows:
        if "conflicts" not in row:
            continue
        print(f"{row['case']:<44} {row['conflicts_per_claim']:>11} "
              f"{row['gc_pauses']:>5.0f}/{row['gc_ms']}/{row['gc_max_ms']:<5} "
              f"{row['loop_stalls']:>5.0f}/{row['stall_ms']}/{row['stall_max_ms']:<6} "
              f"{row['replica_cpu_ms_per_claim']:>12} "
              f"{row['driver_cores']:>6}/{row['etcd_cores']}/{row['replica_cores']}")


if __name__ == "__main__":
    main_cli()
