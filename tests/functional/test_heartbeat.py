"""The node heartbeat against a real etcd, driving libvirt's test driver in this process.

Capacity is read again while the agent runs (a stopped and restarted pool
shows in the node report); a bug in the heartbeat ends it instead of being
retried forever; a crashed predecessor's lease is waited out for as long as
it really has left, whatever TTL that agent used; the reported version is the
installed package's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from nubis.scheduler.v1 import scheduler_pb2

from services.agent import driver as driver_module
from services.agent import heartbeat
from services.common.settings import AgentSettings, EtcdSettings, Settings
from services.common.store import Store
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

ROOT = Path(__file__).resolve().parents[2]


def _settings(etcd: EtcdEndpoint, key_prefix: str, **agent: object) -> Settings:
    return Settings(etcd=EtcdSettings(endpoints=[etcd.endpoint], prefix=key_prefix),
                    agent=AgentSettings(**agent))


@pytest.fixture
def pool_driver() -> Iterator[tuple[driver_module.Driver, str]]:
    """A driver whose node pool is a fresh pool of the in-process test hypervisor."""
    name = f"hb-{uuid.uuid4().hex[:6]}"
    driver = driver_module.Driver("test:///default", storage_pool=name,
                                  storage_pool_path=f"/{name}")
    yield driver, name
    pool = driver.connection.get().storagePoolLookupByName(name)
    if pool.isActive():
        pool.destroy()
    pool.undefine()
    driver.close()


async def _disk_of(store: Store, name: str) -> int | None:
    found = await store.find(heartbeat.node_key(name), scheduler_pb2.NodeReport)
    return None if found is None else found.value.capacity.disk_gb


@pytest.mark.timeout(60)
async def test_capacity_is_read_again_while_running(
    etcd: EtcdEndpoint, key_prefix: str, store: Store,
    pool_driver: tuple[driver_module.Driver, str],
) -> None:
    driver, pool = pool_driver
    name = f"node-{uuid.uuid4().hex[:6]}"
    settings = _settings(etcd, key_prefix, lease_ttl=3, facts_interval=0.3)
    beat = heartbeat.Heartbeat(settings, heartbeat.build_report(driver.facts(), settings, name),
                               driver.facts)
    beat.start()
    try:
        async def disk_is(gb: int) -> bool:
            return await _disk_of(store, name) == gb

        await harness.wait_for(lambda: disk_is(100), 10)
        driver.connection.get().storagePoolLookupByName(pool).destroy()
        await harness.wait_for(lambda: disk_is(0), 10)
        driver.storage.start_pool(pool)
        await harness.wait_for(lambda: disk_is(100), 10)
        assert beat.published.is_set() and not beat.ended()
    finally:
        await asyncio.to_thread(beat.stop)


@pytest.mark.timeout(60)
async def test_a_bug_ends_the_heartbeat_instead_of_retrying(
    etcd: EtcdEndpoint, key_prefix: str, store: Store,
    pool_driver: tuple[driver_module.Driver, str],
) -> None:
    driver, _ = pool_driver
    name = f"node-{uuid.uuid4().hex[:6]}"
    settings = _settings(etcd, key_prefix, lease_ttl=3, facts_interval=0.2)
    reads = 0

    def broken_facts() -> driver_module.HostFacts:
        nonlocal reads
        reads += 1
        raise TypeError("a bug in reading the facts")

    ended = threading.Event()
    beat = heartbeat.Heartbeat(settings, heartbeat.build_report(driver.facts(), settings, name),
                               broken_facts)
    beat.on_ended = ended.set
    beat.start()
    try:
        assert await asyncio.to_thread(ended.wait, 15), "the heartbeat kept retrying a bug"
        assert beat.crashed.is_set() and not beat.refused.is_set()
        assert reads == 1
        # It withdrew the node on the way out (lease revoked), and stays ended.
        await harness.wait_for(lambda: _gone(store, name), 5)
        await asyncio.sleep(1)
        assert reads == 1
    finally:
        await asyncio.to_thread(beat.stop)


async def _gone(store: Store, name: str) -> bool:
    return await store.find(heartbeat.node_key(name), scheduler_pb2.NodeReport) is None


@pytest.mark.timeout(60)
async def test_a_crashed_predecessor_is_waited_out_for_its_own_ttl(
    etcd: EtcdEndpoint, key_prefix: str, store: Store,
    pool_driver: tuple[driver_module.Driver, str],
) -> None:
    """The predecessor ran with a lease of 8 s, this agent runs with 2 s: it must still wait."""
    driver, _ = pool_driver
    name = f"node-{uuid.uuid4().hex[:6]}"
    settings = _settings(etcd, key_prefix, lease_ttl=2)
    report = heartbeat.build_report(driver.facts(), settings, name)
    crashed_lease = await store.grant_lease(8)  # nobody refreshes it: a crashed agent's
    await store.create(heartbeat.node_key(name), report, lease=crashed_lease)
    beat = heartbeat.Heartbeat(settings, report, driver.facts)
    started = time.monotonic()
    beat.start()
    try:
        assert await asyncio.to_thread(beat.wait_settled, 20)
        assert beat.published.is_set(), "refused a name whose holder had crashed"
        assert time.monotonic() - started >= 5  # it waited for the old lease to lapse
        found = await store.find(heartbeat.node_key(name), scheduler_pb2.NodeReport)
        assert found is not None and found.lease not in (0, crashed_lease.id)
    finally:
        await asyncio.to_thread(beat.stop)


@pytest.mark.timeout(60)
async def test_a_live_holder_with_a_long_ttl_is_refused(
    etcd: EtcdEndpoint, key_prefix: str, store: Store,
    pool_driver: tuple[driver_module.Driver, str],
) -> None:
    driver, _ = pool_driver
    name = f"node-{uuid.uuid4().hex[:6]}"
    settings = _settings(etcd, key_prefix, lease_ttl=2)
    report = heartbeat.build_report(driver.facts(), settings, name)
    live_lease = await store.grant_lease(4)
    await store.create(heartbeat.node_key(name), report, lease=live_lease)
    refreshing = store.keep_alive(live_lease)
    beat = heartbeat.Heartbeat(settings, report, driver.facts)
    beat.start()
    try:
        assert await asyncio.to_thread(beat.wait_settled, 20)
        assert beat.refused.is_set() and not beat.published.is_set()
        found = await store.find(heartbeat.node_key(name), scheduler_pb2.NodeReport)
        assert found is not None and found.lease == live_lease.id
    finally:
        refreshing.cancel()
        await asyncio.to_thread(beat.stop)
        await store.revoke_lease(live_lease)


def test_the_version_is_the_installed_package_s(tmp_path: Path) -> None:
    """A nubis distribution of another version first on the path is what the agent reports."""
    dist = tmp_path / "nubis-9.8.7.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nubis\nVersion: 9.8.7\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-c", "from services.agent import heartbeat; print(heartbeat.VERSION)"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )
    assert out.stdout.strip() == "9.8.7"
