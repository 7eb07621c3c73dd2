"""Session fixtures: a real etcd (1 and 3 members) and a real Redis on free loopback ports.

They are started from the system binaries (etcd-server and redis-server
packages), exactly as `nubis lab up` starts them, and stopped by PID afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.client.lab import daemons
from services.common.store import Store


@dataclass
class EtcdEndpoint:
    """A running single-member etcd for the test session."""

    daemon: daemons.Daemon
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class EtcdCluster:
    """A running 3-member etcd cluster; members can be killed by a test."""

    members: list[daemons.Daemon]
    client_ports: list[int]

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.client_ports]


@dataclass
class RedisEndpoint:
    """A running Redis for the test session."""

    daemon: daemons.Daemon
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def etcd_and_redis(workdir: Path) -> Iterator[tuple[EtcdEndpoint, RedisEndpoint]]:
    """An etcd and a Redis of their own under `workdir`, stopped at the end (for benchmarks)."""
    etcd_port, peer, redis_port = daemons.free_ports(3)
    etcd_daemon = daemons.start_etcd(workdir / "etcd", etcd_port, peer)
    try:
        redis_daemon = daemons.start_redis(workdir / "redis", redis_port)
        try:
            yield (EtcdEndpoint(etcd_daemon, "127.0.0.1", etcd_port),
                   RedisEndpoint(redis_daemon, redis_port))
        finally:
            redis_daemon.stop()
    finally:
        etcd_daemon.stop()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdEndpoint]:
    base = tmp_path_factory.mktemp("etcd")
    port, peer = daemons.free_ports(2)
    daemon = daemons.start_etcd(base / "data", port, peer)
    try:
        yield EtcdEndpoint(daemon, "127.0.0.1", port)
    finally:
        daemon.stop()


def start_cluster(base: Path, size: int = 3) -> EtcdCluster:
    """Start `size` etcd members on free ports forming one cluster."""
    names = [f"m{i}" for i in range(size)]
    ports = daemons.free_ports(2 * len(names))
    client_ports, peer_ports = ports[:len(names)], ports[len(names):]
    initial = ",".join(
        f"{name}=http://127.0.0.1:{peer}" for name, peer in zip(names, peer_ports, strict=True)
    )
    members = [
        daemons.start_etcd(base / name, client, peer, name=name, initial_cluster=initial,
                           wait=False)
        for name, client, peer in zip(names, client_ports, peer_ports, strict=True)
    ]
    for member, port in zip(members, client_ports, strict=True):
        daemons.wait_for_port("127.0.0.1", port, 30, member.proc, member.log_path)
    return EtcdCluster(members, client_ports)


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster per test (tests kill members)."""
    cluster = start_cluster(tmp_path / "etcd-cluster")
    try:
        yield cluster
    finally:
        for member in cluster.members:
            member.stop()


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisEndpoint]:
    base = tmp_path_factory.mktemp("redis")
    port = daemons.free_port()
    daemon = daemons.start_redis(base / "data", port)
    try:
        yield RedisEndpoint(daemon, port)
    finally:
        daemon.stop()


@pytest.fixture
def key_prefix() -> str:
    """A unique etcd prefix for one test, so tests sharing the session etcd never collide."""
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[Store]:
    """A Store connected to the session etcd, rooted at this test's unique prefix."""
    connected = await Store.connect([etcd.endpoint], root=key_prefix)
    try:
        yield connected
    finally:
        await connected.close()
