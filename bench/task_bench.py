"""Task benchmark: agent round trips through the shared TaskSender next to raw Celery.

Starts its own etcd, Redis and two agents (libvirt test driver), then times
the no-op task (`nubis.agent.ping`: service → agent → service) two ways in the
same run: through `TaskSender.send` from asyncio, and through Celery's own
``send_task(...).get()`` (its Redis result consumer), with the same payload.
One caller at a time gives the round-trip latency and the sender's overhead
ratio; then 32 calls in flight spread over both agents give the throughput.
Rounds alternate which side goes first, so a burst of load from elsewhere
hits one round, not one side. Usage:
``python bench/task_bench.py [--calls N] [--rounds R] [--in-flight K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from celery import Celery
from nubis.agent.v1 import tasks_pb2

from services.client.lab import daemons
from services.common import tasks
from services.common.logging import configure_logging
from services.common.settings import Settings
from services.common.task_sender import SenderConfig, TaskSender

NODES = ("bench-a", "bench-b")
TARGET_RATIO = 1.3
"""Sender time per round trip over raw Celery's, one caller at a time."""
TARGET_RATE = 200.0
"""Round trips per second through the sender with 32 in flight on 2 agents."""
PAYLOAD = tasks.to_json(tasks_pb2.PingRequest())


class Raw:
    """Celery's own client: send_task, then AsyncResult.get on its result consumer."""

    def __init__(self, redis_url: str) -> None:
        self.app = Celery("nubis-bench-raw", broker=redis_url, backend=redis_url,
                          set_as_current=False)
        self.app.conf.update(task_serializer="json", accept_content=["json"])

    def call(self, node: str) -> None:
        result = self.app.send_task(tasks.PING.name, queue=tasks.queue_name(node),
                                    kwargs={tasks.OPERATION_ID: "bench", tasks.REQUEST: PAYLOAD})
        outcome = result.get(timeout=30)
        tasks.outcome_response(tasks.PING, outcome, node)


def _start_agents(redis_url: str, etcd: str, workdir: Path) -> list[daemons.Daemon]:
    env = {**os.environ, "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd]),
           "NUBIS_REDIS_URL": redis_url, "NUBIS_LOG_LEVEL": "warning", "NUBIS_LOG_JSON": "false"}
    return [
        daemons.spawn(f"agent-{node}",
                      [sys.executable, "-m", "services.agent.main", "--node-name", node],
                      workdir / f"{node}.log", env=env)
        for node in NODES
    ]


async def _sender_round(sender: TaskSender, calls: int, in_flight: int) -> float:
    """Seconds per round trip with `in_flight` callers sharing `calls` calls."""
    counter = iter(range(calls))

    async def caller() -> None:
        for index in counter:
            await sender.send(NODES[index % len(NODES)], tasks.PING, tasks_pb2.PingRequest(),
                              operation_id=tasks.OperationId("bench"))

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return (time.perf_counter() - started) / calls


def _raw_round(raw: Raw, calls: int, in_flight: int) -> float:
    counter = iter(range(calls))

    def caller() -> None:
        for index in counter:
            raw.call(NODES[index % len(NODES)])

    started = time.perf_counter()
    if in_flight == 1:
        caller()
    else:
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            for future in [pool.submit(caller) for _ in range(in_flight)]:
                future.result()
    return (time.perf_counter() - started) / calls


async def _cell(name: str, rounds: int, sender_side: Callable[[], Awaitable[float]],
                raw_side: Callable[[], float]) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    theirs: list[float] = []
    for round_index in range(rounds):
        if round_index % 2:
            ours.append(await sender_side())
            theirs.append(await asyncio.to_thread(raw_side))
        else:
            theirs.append(await asyncio.to_thread(raw_side))
            ours.append(await sender_side())
    ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
    print(f"{name:<28} sender {statistics.median(ours) * 1e3:7.3f} ms/call "
          f"({1 / statistics.median(ours):7.0f}/s)   raw Celery "
          f"{statistics.median(theirs) * 1e3:7.3f} ms/call ({1 / statistics.median(theirs):7.0f}/s)"
          f"   ratio {ratio:.2f}")
    return ours, theirs


async def run(redis_url: str, args: argparse.Namespace) -> bool:
    sender = await TaskSender.connect(SenderConfig(broker_url=redis_url, result_url=redis_url))
    raw = Raw(redis_url)
    try:
        for node in NODES:  # the agents are up once each answers
            await sender.send(node, tasks.PING, tasks_pb2.PingRequest(),
                              operation_id=tasks.OperationId("warm-up"), deadline=60)
        await asyncio.to_thread(raw.call, NODES[0])
        await _sender_round(sender, 200, 4)
        print(f"ping round trips, {args.calls} calls per round, {args.rounds} rounds, "
              f"{len(NODES)} agents")
        ours, theirs = await _cell(
            "1 in flight", args.rounds,
            lambda: _sender_round(sender, args.calls, 1),
            lambda: _raw_round(raw, args.calls, 1))
        ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
        many, _ = await _cell(
            f"{args.in_flight} in flight", args.rounds,
            lambda: _sender_round(sender, args.calls * 2, args.in_flight),
            lambda: _raw_round(raw, args.calls * 2, args.in_flight))
        rate = 1 / statistics.median(many)
        print(f"targets: overhead ratio {ratio:.2f} (<= {TARGET_RATIO}), "
              f"{rate:.0f} round trips/s with {args.in_flight} in flight (>= {TARGET_RATE:.0f})")
        return ratio <= TARGET_RATIO and rate >= TARGET_RATE
    finally:
        await sender.close()
        raw.app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    configure_logging(Settings(log_level="warning", log_json=False))
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        etcd_port, peer, redis_port = daemons.free_port(), daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(workdir / "etcd", etcd_port, peer)
        redis = daemons.start_redis(workdir / "redis", redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        agents = _start_agents(redis_url, f"127.0.0.1:{etcd_port}", workdir)
        try:
            met = asyncio.run(run(redis_url, args))
        finally:
            for daemon in [*agents, redis, etcd]:
                daemon.stop()
    print("targets met" if met else "targets NOT met")


if __name__ == "__main__":
    main()
