"""A service across an etcd outage: health follows etcd, the catalog entry comes back by itself.

The etcd here is the test's own (stopped and started again, or reached
through a proxy the test cuts); the session etcd is never stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from nubis.identity.v1 import identity_pb2

from services.client.lab import daemons, health
from services.common import catalog, supervise
from services.common.store import Lease, Store
from tests.functional import serving
from tests.functional.tcp_proxy import TcpProxy

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK = supervise.RestartPolicy(first_delay=0.05, max_delay=0.5)


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[daemons.Daemon]:
    daemon = daemons.start_etcd(tmp_path / "etcd", daemons.free_port(), daemons.free_port())
    try:
        yield daemon
    finally:
        daemon.stop()


def restart_etcd(stopped: daemons.Daemon, tmp_path: Path) -> daemons.Daemon:
    """Start etcd again on the data and ports of `stopped`."""
    client, peer = stopped.ports
    return daemons.start_etcd(tmp_path / "etcd", client, peer)


async def health_becomes(address: str, wanted: str, within: float = 20.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if await health.grpc_health(address) == wanted:
                return
            await asyncio.sleep(0.1)


async def test_health_follows_etcd_and_the_process_lives_through_the_outage(
    own_etcd: daemons.Daemon, tmp_path: Path,
) -> None:
    port = daemons.free_port()
    env = {
        **os.environ,
        "NUBIS_ETCD__ENDPOINTS": json.dumps([f"127.0.0.1:{own_etcd.ports[0]}"]),
        "NUBIS_ETCD__TIMEOUT": "1.0",
        "NUBIS_ETCD__HEALTH_INTERVAL": "0.2",
        "NUBIS_LOG_JSON": "true",
    }
    log_path = tmp_path / "echo.log"
    echo = daemons.spawn("echo", [sys.executable, "-m", "tests.functional.echo_main",
                                  "--port", str(port)], log_path, env=env, cwd=REPO_ROOT)
    etcd = own_etcd
    try:
        address = f"127.0.0.1:{port}"
        await serving.wait_serving(address, echo.proc, lambda: log_path.read_text())
        etcd.stop()
        await health_becomes(address, health.NOT_SERVING)
        etcd = restart_etcd(etcd, tmp_path)
        await health_becomes(address, health.SERVING)
        assert echo.alive(), log_path.read_text()
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        assert "etcd unreachable; not serving" in events
        assert "etcd reachable again; serving" in events
    finally:
        echo.stop(timeout=5)
        etcd.stop()


async def endpoints(store: Store, name: str) -> list[tuple[identity_pb2.Endpoint, int]]:
    items, _ = await store.list_all(catalog.endpoint_prefix(name), identity_pb2.Endpoint)
    found = []
    for item in items:
        held = await store.find(item.key, identity_pb2.Endpoint)
        if held is not None:
            found.append((held.value, held.lease))
    return found


async def wait_endpoints(store: Store, name: str, count: int,
                         within: float = 15.0) -> list[tuple[identity_pb2.Endpoint, int]]:
    async with asyncio.timeout(within):
        while True:
            found = await endpoints(store, name)
            if len(found) == count:
                return found
            await asyncio.sleep(0.05)


async def test_a_catalog_entry_lost_with_its_lease_is_registered_again(store: Store) -> None:
    keeper = asyncio.create_task(catalog.keep_registered(
        store, "svc", "nubis.test.v1.Svc", "127.0.0.1:9", ttl=2, restart_policy=QUICK))
    try:
        [(entry, lease)] = await wait_endpoints(store, "svc", 1)
        with structlog.testing.capture_logs() as logs:
            # What a lease that lapsed while etcd was out of reach looks like: gone, keys too.
            await store.revoke_lease(Lease(id=lease, ttl=2))
            await wait_endpoints(store, "svc", 0, within=5)
            [(again, new_lease)] = await wait_endpoints(store, "svc", 1)
        assert again.instance_id == entry.instance_id and again.address == entry.address
        assert new_lease != lease
        assert not keeper.done()
        assert any(e["event"] == "catalog entry lost with its lease; registering again"
                   for e in logs)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    assert await endpoints(store, "svc") == []  # shutdown withdraws it


async def test_catalog_registration_waits_for_etcd(own_etcd: daemons.Daemon) -> None:
    proxy = TcpProxy(own_etcd.ports[0])
    await proxy.start()
    behind = await Store.connect([proxy.endpoint], root="/catalog", timeout=1.0)
    direct = await Store.connect([f"127.0.0.1:{own_etcd.ports[0]}"], root="/catalog")
    await proxy.cut()
    keeper = asyncio.create_task(catalog.keep_registered(
        behind, "svc", "nubis.test.v1.Svc", "127.0.0.1:9", ttl=2, restart_policy=QUICK))
    try:
        await asyncio.sleep(2.5)  # etcd out of reach: several attempts fail meanwhile
        assert not keeper.done()
        assert await endpoints(direct, "svc") == []
        await proxy.restore()
        await wait_endpoints(direct, "svc", 1)
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        await proxy.cut()
        await behind.close()
        await direct.close()
