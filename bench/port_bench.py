"""Port benchmark: port creations per second next to raw etcd create-if-absent, in one run.

Starts a private etcd and Redis, makes a network with a /16 subnet, and
measures, at 1 and 20 concurrent clients, in alternating rounds:

- ``raw``: the aetcd client creating a fresh key if absent (one transaction
  comparing create_revision == 0), the floor of any create in nubis;
- ``port (domain)``: what the network service runs for CreatePort (MAC and
  fixed IP keys, index, quota, default security group; concurrent creates of
  a project share transactions, `port_batch`), without gRPC;
- ``port (gRPC)``: CreatePort through a network servicer on a local gRPC
  server in a process of its own, as a replica runs (the service's interceptor
  and logging, its access lines written to a file; no token checks), what a
  client of one replica sees. The clients are the bench process's, as they
  are for ``raw``.

Prints op/s per cell (median over rounds), each port rate over the raw rate
of the same concurrency (goal: >= 0.5), and the CPU the bench process, the
network process and etcd used meanwhile (in cores), so a saturated client
shows. Usage: ``python bench/port_bench.py [--ports N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aetcd
from google.protobuf import wrappers_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    network_pb2,
    network_service_pb2_grpc,
    port_pb2,
    subnet_pb2,
)

from services.client import peers
from services.client.channel import make_channel
from services.client.lab import daemons
from services.common import logging as nubis_logging
from services.common import quota, server
from services.common.settings import EtcdSettings, ServiceEndpoint, Settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.network import network, port, port_batch, servicer, subnet

CALLERS = (1, 20)
GOAL = 0.5
PROJECT = str(uuid.uuid4())
Op = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Cpu:
    """CPU seconds so far of the bench process and of the other processes of the run."""

    pids: tuple[int, ...]

    def now(self) -> tuple[float, ...]:
        tick = os.sysconf("SC_CLK_TCK")
        used = [time.process_time()]
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used.append((int(fields[11]) + int(fields[12])) / tick)  # utime + stime
        return tuple(used)


Measured = tuple[float, tuple[float, ...]]  # op/s, cores used per process


async def rate(op: Op, count: int, clients: int, cpu: Cpu) -> Measured:
    """Calls of `op` per second with `clients` concurrent callers sharing `count` calls,
    and the cores each process used meanwhile."""
    todo = iter(range(count))

    async def caller() -> None:
        for i in iter(lambda: next(todo, None), None):
            await op(i)

    before = cpu.now()
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return count / elapsed, tuple((after - then) / elapsed
                                  for then, after in zip(before, cpu.now(), strict=True))


def raw_create(client: aetcd.Client) -> Op:
    tx = client.transactions
    numbers = itertools.count()

    async def create(i: int) -> object:
        key = f"/bench-raw/{next(numbers)}".encode()
        ok, _ = await client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, wrappers_pb2.Int64Value(value=i).SerializeToString())],
            failure=[tx.get(key)])
        assert ok
        return ok

    return create


async def make_network(store: Store, settings: Settings) -> str:
    made = await network.create(store, settings.networking, None, network_pb2.CreateNetworkRequest(
        network=network_pb2.Network()), PROJECT)
    await subnet.create(store, None, subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        network_id=made.meta.id, cidr="10.0.0.0/16", dhcp_enabled=True)))
    return made.meta.id


def domain_create(creation: port.Creation, network_id: str) -> Op:
    batcher = port_batch.Batcher()

    async def create(i: int) -> object:
        return await batcher.create(creation, port_pb2.CreatePortRequest(
            port=port_pb2.Port(network_id=network_id)))

    return create


def grpc_create(stub: network_service_pb2_grpc.NetworkServiceAsyncStub, network_id: str) -> Op:
    async def create(i: int) -> object:
        return await stub.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
            network_id=network_id, meta=resource_pb2.ResourceMeta(project_id=PROJECT))))

    return create


def bench_settings(etcd_endpoint: str, redis_url: str) -> Settings:
    return Settings(etcd=EtcdSettings(endpoints=[etcd_endpoint], prefix="/bench"),
                    redis_url=redis_url)


async def serve(etcd_endpoint: str, redis_url: str, log: TextIO) -> None:
    """The network side of the gRPC cells (``--serve``): a servicer on a local gRPC server,
    logging as a service's to `log`; prints its address, serves until stdin closes."""
    settings = bench_settings(etcd_endpoint, redis_url)
    nubis_logging.configure_logging(settings, stream=log)
    store = await Store.from_settings(settings.etcd)
    sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    clients = peers.ServiceClients(peers.ClientSettings(identity_address="127.0.0.1:1",
                                                        credential=None))
    handler = servicer.NetworkServicer(store, settings, sender, clients)
    running = await server.start(ServiceEndpoint(host="127.0.0.1", port=0), [
        server.Registration("nubis.network.v1.NetworkService", handler,
                            network_service_pb2_grpc.add_NetworkServiceServicer_to_server)],
        settings=settings)
    print(running.address, flush=True)
    try:
        await asyncio.to_thread(sys.stdin.read)
    finally:
        await running.stop(0)
        await clients.close()
        await sender.close()
        await store.close()


def start_server(etcd_endpoint: str, redis_url: str,
                 log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """The network process of the gRPC cells and its address."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", etcd_endpoint, redis_url, str(log_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        proc.wait()
        raise SystemExit(f"the network process ended ({proc.returncode}); see {log_path}")
    return proc, address


async def run_all(etcd_endpoint: str, redis_url: str, address: str, cpu: Cpu, ports: int,
                  rounds: int) -> dict[tuple[str, int], list[Measured]]:
    settings = bench_settings(etcd_endpoint, redis_url)
    store = await Store.from_settings(settings.etcd)
    await store.create(quota.DEFAULTS_KEY, identity_pb2.Quota(
        limits={name: quota.UNLIMITED for name in quota.RESOURCES}))
    host, _, etcd_port = etcd_endpoint.rpartition(":")
    client = aetcd.Client(host=host, port=int(etcd_port))
    channel = make_channel(address)
    stub = network_service_pb2_grpc.NetworkServiceStub(channel)
    found: dict[tuple[str, int], list[Measured]] = {}
    try:
        creation = port.Creation(store, settings.networking, port.Turns(), None, PROJECT)
        sides: dict[str, Op] = {
            "raw": raw_create(client),
            "port (domain)": domain_create(creation, await make_network(store, settings)),
            "port (gRPC)": grpc_create(stub, await make_network(store, settings)),
        }
        for clients_now in CALLERS:
            for number in range(rounds + 1):  # round 0 warms up
                order = list(sides.items()) if number % 2 else list(reversed(sides.items()))
                for name, op in order:
                    measured = await rate(op, ports, clients_now, cpu)
                    if number:
                        found.setdefault((name, clients_now), []).append(measured)
    finally:
        await channel.close()
        await client.close()
        await store.close()
    return found


def print_table(found: dict[tuple[str, int], list[Measured]]) -> None:
    print(f"{'operation':<16}{'clients':>8}{'op/s':>10}{'vs raw':>9}"
          f"{'cores: bench':>15}{'network':>9}{'etcd':>7}")
    for clients_now in CALLERS:
        raw = statistics.median(rate for rate, _ in found[("raw", clients_now)])
        for name in ("raw", "port (domain)", "port (gRPC)"):
            cells = found[(name, clients_now)]
            value = statistics.median(rate for rate, _ in cells)
            ratio = "" if name == "raw" else f"{value / raw:.2f}"
            cores = [statistics.median(used[i] for _, used in cells) for i in range(3)]
            print(f"{name:<16}{clients_now:>8}{value:>10.0f}{ratio:>9}"
                  f"{cores[0]:>15.2f}{cores[1]:>9.2f}{cores[2]:>7.2f}")
    print(f"goal: port creations >= {GOAL} x raw create-if-absent at the same concurrency")


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        with open(sys.argv[4], "a", encoding="utf-8") as log:
            asyncio.run(serve(sys.argv[2], sys.argv[3], log))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ports", type=int, default=400, help="calls per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per cell")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nubis-port-bench-") as tmp:
        etcd_port, peer, redis_port = daemons.free_ports(3)
        etcd = daemons.start_etcd(Path(tmp) / "etcd", etcd_port, peer)
        redis = daemons.start_redis(Path(tmp) / "redis", redis_port)
        endpoint, redis_url = f"127.0.0.1:{etcd_port}", f"redis://127.0.0.1:{redis_port}/0"
        network_proc: subprocess.Popen[str] | None = None
        try:
            network_proc, address = start_server(endpoint, redis_url, Path(tmp) / "network.log")
            cpu = Cpu((network_proc.pid, etcd.pid))
            found = asyncio.run(run_all(endpoint, redis_url, address, cpu, args.ports,
                                        args.rounds))
        finally:
            if network_proc is not None:
                assert network_proc.stdin is not None
                network_proc.stdin.close()  # the network process drains and ends
                network_proc.wait(timeout=30)
            redis.stop()
            etcd.stop()
    print_table(found)


if __name__ == "__main__":
    main()
