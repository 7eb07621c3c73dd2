"""Store benchmark: the nubis Store against the raw aetcd client, on one private etcd.

Runs create, compare-and-swap update and get at 1 and 16 concurrent callers,
first through the Store, then through aetcd doing the same etcd work (same
protobuf payloads, same transactions), and prints ops/s, p50/p99 latency and
the overhead ratio store/raw. Usage: ``python bench/store_bench.py [--ops N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aetcd
from google.protobuf import wrappers_pb2

from services.client.lab import daemons
from services.common.store import Store

Counter = wrappers_pb2.Int64Value
Op = Callable[[int], Awaitable[object]]


@dataclass
class Result:
    """Throughput and latency of one operation at one concurrency."""

    ops_per_s: float
    p50_ms: float
    p99_ms: float


async def measure(op: Op, total: int, concurrency: int) -> Result:
    """Run op(0..total-1) split over `concurrency` callers."""
    latencies: list[float] = []

    async def caller(first: int) -> None:
        for i in range(first, total, concurrency):
            started = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100)
    return Result(total / elapsed, cuts[49] * 1000, cuts[98] * 1000)


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


async def run_all(endpoint: str, total: int) -> list[tuple[str, int, Result, Result]]:
    host, port = endpoint.split(":")
    store = await Store.connect([endpoint], root="/nubis-bench")
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    rows = []
    try:
        for concurrency in (1, 16):
            for round_ in range(2):  # the first round warms up; the second is reported
                run = f"c{concurrency}-r{round_}"
                s_ops, r_ops = store_ops(store, "s" + run), raw_ops(client, "r" + run)
                for name in s_ops:
                    # Alternate who goes first so neither side benefits from a warmer etcd.
                    raw = await measure(r_ops[name], total, concurrency)
                    mine = await measure(s_ops[name], total, concurrency)
                    if round_ == 1:
                        rows.append((name, concurrency, mine, raw))
    finally:
        await store.close()
        await client.close()
    return rows


def print_table(rows: list[tuple[str, int, Result, Result]]) -> None:
    header = (f"{'operation':<11} {'callers':>7} | {'store op/s':>10} {'p50 ms':>7} "
              f"{'p99 ms':>7} | {'raw op/s':>9} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for name, concurrency, mine, raw in rows:
        ratio = raw.ops_per_s / mine.ops_per_s  # time per op, store over raw
        print(f"{name:<11} {concurrency:>7} | {mine.ops_per_s:>10.0f} {mine.p50_ms:>7.2f} "
              f"{mine.p99_ms:>7.2f} | {raw.ops_per_s:>9.0f} {raw.p50_ms:>7.2f} "
              f"{raw.p99_ms:>7.2f} | {ratio:>5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nubis-store-bench-") as tmp:
        port, peer = daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(Path(tmp) / "etcd", port, peer)
        try:
            rows = asyncio.run(run_all(f"127.0.0.1:{port}", args.ops))
        finally:
            etcd.stop()
    print_table(rows)


if __name__ == "__main__":
    main()
