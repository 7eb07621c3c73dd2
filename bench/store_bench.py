"""Store benchmark: the nubis Store against the raw aetcd client, on one private etcd.

Runs create, compare-and-swap update and get at 1 and 16 concurrent callers,
through the Store and through aetcd doing the same etcd work (same protobuf
payloads, same transactions). Each (operation, callers) cell is measured in
several short rounds that alternate which side goes first (raw, store, store,
raw, ...), so a burst of load from elsewhere on the machine hits one round,
not one side. The table shows median op/s per side, p50/p99 latency over all
rounds, the client CPU per call (event-loop thread only, so etcd's share of the
machine does not count), and the median of the per-round ratios store/raw with
their interquartile range. Usage: ``python bench/store_bench.py [--ops N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aetcd
from google.protobuf import wrappers_pb2

from services.client.lab import daemons
from services.common.store import Store

Counter = wrappers_pb2.Int64Value
Op = Callable[[int], Awaitable[object]]
OPERATIONS = ("create", "CAS update", "get")
CALLERS = (1, 16)
TARGET_RATIO = 1.2
"""Store time per call over raw time per call that the store must stay within."""


@dataclass
class Round:
    """One timed run of `count` calls."""

    ops_per_s: float
    cpu_us_per_op: float
    latencies: list[float]


@dataclass
class Side:
    """Every round of one side (store or raw) in one cell."""

    rounds: list[Round] = field(default_factory=list)

    def median_ops(self) -> float:
        return statistics.median(r.ops_per_s for r in self.rounds)

    def median_cpu(self) -> float:
        return statistics.median(r.cpu_us_per_op for r in self.rounds)

    def latency_ms(self, percentile: int) -> float:
        pooled = [latency for r in self.rounds for latency in r.latencies]
        return statistics.quantiles(pooled, n=100)[percentile - 1] * 1000


@dataclass
class Cell:
    """Store and raw measurements of one operation at one concurrency."""

    name: str
    callers: int
    store: Side = field(default_factory=Side)
    raw: Side = field(default_factory=Side)

    def ratios(self) -> list[float]:
        """Store time over raw time, per round (the two sides of a round ran back to back)."""
        return [r.ops_per_s / s.ops_per_s for s, r in zip(self.store.rounds, self.raw.rounds,
                                                            strict=True)]


async def measure(op: Op, first: int, count: int, concurrency: int) -> Round:
    """Run op(first..first+count-1) split over `concurrency` callers."""
    latencies: list[float] = []

    async def caller(start: int) -> None:
        for i in range(start, first + count, concurrency):
            started = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - started)

    # Collect now, so that garbage left by the other side is not collected on our time.
    gc.collect()
    cpu_started, started = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(caller(first + c) for c in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    return Round(count / elapsed, cpu / count * 1e6, latencies)


def store_ops(store: Store, run: str) -> dict[str, Op]:
    async def create(i: int) -> object:
        return await store.create(f"bench/{run}/{i}", Counter(value=i))

    async def update(i: int) -> object:
        return await store.update(f"bench/{run}/{i}", Counter, bump)

    async def get(i: int) -> object:
        return await store.get(f"bench/{run}/{i}", Counter)

    return {"create": create, "CAS update": update, "get": get}


def bump(counter: Counter) -> Counter:
    counter.value += 1
    return counter


def raw_ops(client: aetcd.Client, run: str) -> dict[str, Op]:
    tx = client.transactions

    def key(i: int) -> bytes:
        return f"/nubis-bench/bench/{run}/{i}".encode()

    async def create(i: int) -> object:
        k = key(i)
        ok, _ = await client.transaction(
            compare=[tx.create(k) == 0],
            success=[tx.put(k, Counter(value=i).SerializeToString())],
            failure=[tx.get(k)],
        )
        assert ok
        return ok

    async def update(i: int) -> object:
        k = key(i)
        got = await client.get(k)
        value = Counter.FromString(got.value)
        value.value += 1
        ok, _ = await client.transaction(
            compare=[tx.mod(k) == got.mod_revision],
            success=[tx.put(k, value.SerializeToString())],
            failure=[tx.get(k)],
        )
        assert ok
        return ok

    async def get(i: int) -> object:
        got = await client.get(key(i))
        return Counter.FromString(got.value)

    return {"create": create, "CAS update": update, "get": get}


async def run_round(
    cells: dict[str, Cell], s_ops: dict[str, Op], r_ops: dict[str, Op],
    first: int, count: int, store_first: bool,
) -> None:
    """One round of every operation (create, then update and get the created keys)."""
    for name, cell in cells.items():
        sides = [(cell.raw, r_ops[name]), (cell.store, s_ops[name])]
        for side, op in reversed(sides) if store_first else sides:
            side.rounds.append(await measure(op, first, count, cell.callers))


async def run_all(endpoint: str, total: int, rounds: int) -> list[Cell]:
    host, port = endpoint.split(":")
    store = await Store.connect([endpoint], root="/nubis-bench")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    per_round = max(1, total // rounds)
    measured: list[Cell] = []
    try:
        for callers in CALLERS:
            cells = {name: Cell(name, callers) for name in OPERATIONS}
            s_ops, r_ops = store_ops(store, f"s-c{callers}"), raw_ops(client, f"r-c{callers}")
            # Round 0 warms up both sides (connections, etcd caches) and is not counted.
            await run_round({n: Cell(n, callers) for n in OPERATIONS}, s_ops, r_ops,
                            0, per_round, False)
            for round_ in range(1, rounds + 1):
                # ABBA: each side goes first in every other round.
                await run_round(cells, s_ops, r_ops, round_ * per_round, per_round,
                                store_first=round_ % 2 == 0)
            measured.extend(cells.values())
    finally:
        await store.close()
        await client.close()
    return measured


def print_table(cells: list[Cell]) -> None:
    header = (f"{'operation':<10} {'callers':>7} | {'store op/s':>10} {'p50 ms':>6} "
              f"{'p99 ms':>6} {'cpu us':>6} | {'raw op/s':>8} {'p50 ms':>6} {'p99 ms':>6} "
              f"{'cpu us':>6} | {'ratio':>5} {'spread':>11}")
    print(header)
    print("-" * len(header))
    over = []
    for cell in cells:
        s, r, ratios = cell.store, cell.raw, cell.ratios()
        q1, ratio, q3 = statistics.quantiles(ratios, n=4)
        if ratio > TARGET_RATIO:
            over.append(f"{cell.name} x{cell.callers}")
        print(f"{cell.name:<10} {cell.callers:>7} | {s.median_ops():>10.0f} "
              f"{s.latency_ms(50):>6.2f} {s.latency_ms(99):>6.2f} {s.median_cpu():>6.0f} | "
              f"{r.median_ops():>8.0f} {r.latency_ms(50):>6.2f} {r.latency_ms(99):>6.2f} "
              f"{r.median_cpu():>6.0f} | {ratio:>5.2f} {q1:>5.2f}-{q3:<5.2f}")
    print(f"\nop/s and cpu us (client CPU per call): medians over {len(cells[0].ratios())} "
          "rounds;\nratio: median of the per-round store/raw time ratios; spread: their "
          "interquartile range.")
    verdict = "met in every cell" if not over else f"exceeded for {', '.join(over)}"
    print(f"Target ratio <= {TARGET_RATIO}: {verdict}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=8000,
                        help="operations per side and cell, spread over the rounds")
    parser.add_argument("--rounds", type=int, default=16,
                        help="measured rounds per cell (plus one warm-up round)")
    args = parser.parse_args()
    if args.ops < 1 or args.rounds < 2 or args.ops < args.rounds * 16:
        parser.error("need --rounds >= 2 and --ops >= 16 * --rounds")
    with tempfile.TemporaryDirectory(prefix="nubis-store-bench-") as tmp:
        port, peer = daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(Path(tmp) / "etcd", port, peer)
        try:
            cells = asyncio.run(run_all(f"127.0.0.1:{port}", args.ops, args.rounds))
        finally:
            etcd.stop()
    print_table(cells)


if __name__ == "__main__":
    main()
