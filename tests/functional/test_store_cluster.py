"""Store failover on a real 3-member etcd cluster: SIGKILL the member in use, keep going."""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import time

import pytest
from google.protobuf import wrappers_pb2

from services.client.lab import daemons
from services.common import errors
from services.common.store import Store, Txn, WatchEvent
from tests.conftest import EtcdCluster

Counter = wrappers_pb2.Int64Value
Text = wrappers_pb2.StringValue

pytestmark = pytest.mark.slow


def leader_endpoint(cluster: EtcdCluster) -> str:
    """The client endpoint of the raft leader, as etcdctl reports it (waits for an election)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run(
            [daemons.require_binary("etcdctl"), "--endpoints", ",".join(cluster.endpoints),
             "--command-timeout=1s", "endpoint", "status", "-w", "json"],
            capture_output=True, text=True, env={"ETCDCTL_API": "3"}, timeout=10,
        ).stdout
        for status in json.loads(out or "[]"):
            if status["Status"]["header"]["member_id"] == status["Status"]["leader"]:
                return str(status["Endpoint"]).removeprefix("http://")
        time.sleep(0.2)
    raise AssertionError("the cluster elected no leader within 20 s")


def member_at(cluster: EtcdCluster, endpoint: str) -> daemons.Daemon:
    return cluster.members[cluster.endpoints.index(endpoint)]


def ordered(cluster: EtcdCluster, first: str) -> list[str]:
    return [first] + [e for e in cluster.endpoints if e != first]


@pytest.mark.parametrize("victim", ["leader", "follower"])
async def test_kill_the_member_in_use_next_operation_succeeds_within_5s(
    etcd_cluster: EtcdCluster, key_prefix: str, victim: str
) -> None:
    leader = leader_endpoint(etcd_cluster)
    first = leader if victim == "leader" else next(
        e for e in etcd_cluster.endpoints if e != leader)
    store = await Store.connect(ordered(etcd_cluster, first), root=key_prefix, timeout=5.0)
    try:
        await store.create("counter", Counter(value=0))
        assert store.endpoint == first
        member_at(etcd_cluster, store.endpoint).kill()

        started = time.monotonic()
        assert (await store.get("counter", Counter)).value.value == 0
        read_after = time.monotonic() - started
        await store.update("counter", Counter, lambda c: Counter(value=c.value + 1))
        write_after = time.monotonic() - started
        assert read_after < 5 and write_after < 5, (read_after, write_after)
        assert store.endpoint != first
        # No write was applied twice while failing over.
        assert (await store.get("counter", Counter)).value.value == 1
    finally:
        await store.close()


async def test_writes_racing_a_leader_kill_are_applied_exactly_once(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    leader = leader_endpoint(etcd_cluster)
    store = await Store.connect(ordered(etcd_cluster, leader), root=key_prefix)
    try:
        await store.create("log", Text(value=""))

        async def append(i: int) -> None:
            # Each writer's value is unique, as a resource with its update_time is.
            await store.update("log", Text, lambda t: Text(value=f"{t.value},w{i}"))

        async def record(txn: Txn, i: int) -> None:
            entry = await txn.get("txlog", Text)
            txn.put("txlog", Text(value=f"{entry.value.value if entry else ''},t{i}"))
            txn.create(f"requests/r{i}", Text(value=f"t{i}"))

        writers = [asyncio.create_task(append(i)) for i in range(10)]
        writers += [asyncio.create_task(store.atomic(functools.partial(record, i=i)))
                    for i in range(10)]
        await asyncio.sleep(0.01)
        member_at(etcd_cluster, leader).kill()
        writers += [asyncio.create_task(append(i)) for i in range(10, 20)]
        creates = [asyncio.create_task(store.create(f"ids/{i}", Text(value=f"{i}")))
                   for i in range(20)]
        await asyncio.gather(*writers, *creates)
        entries = (await store.get("log", Text)).value.value.split(",")[1:]
        assert sorted(entries) == sorted(f"w{i}" for i in range(20))
        tx_entries = (await store.get("txlog", Text)).value.value.split(",")[1:]
        assert sorted(tx_entries) == sorted(f"t{i}" for i in range(10))
    finally:
        await store.close()


async def test_watch_keeps_delivering_after_failover(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    store = await Store.connect(etcd_cluster.endpoints, root=key_prefix)
    try:
        start = await store.revision() + 1
        seen: list[WatchEvent[Counter]] = []

        async def follow() -> None:
            async for event in store.watch("w/", Counter, start_revision=start):
                seen.append(event)
                if len(seen) == 10:
                    return

        watching = asyncio.create_task(follow())
        for i in range(5):
            await store.create(f"w/{i}", Counter(value=i))
        for _ in range(100):
            if len(seen) >= 5:
                break
            await asyncio.sleep(0.05)
        member_at(etcd_cluster, store.endpoint).kill()
        for i in range(5, 10):
            await store.create(f"w/{i}", Counter(value=i))
        await asyncio.wait_for(watching, 10)
        assert [e.key for e in seen] == [f"w/{i}" for i in range(10)]
        revisions = [e.mod_revision for e in seen]
        assert revisions == sorted(set(revisions))
    finally:
        await store.close()


async def test_a_member_without_leader_refuses_at_once_instead_of_holding_the_call(
    etcd_cluster: EtcdCluster, key_prefix: str
) -> None:
    survivor = leader_endpoint(etcd_cluster)  # also waits until the new cluster has a leader
    setup = await Store.connect([survivor], root=key_prefix)
    try:
        await setup.create("k", Counter(value=1))
    finally:
        await setup.close()
    store = await Store.connect([survivor], root=key_prefix, timeout=1.0)
    try:
        for member in etcd_cluster.members:
            if member is not member_at(etcd_cluster, survivor):
                member.kill()
        # Once the survivor notices it has no leader (an election timeout), every read
        # is refused with "no leader"; without require-leader it would wait for a
        # quorum and time out instead.
        give_up = time.monotonic() + 15
        while True:
            with pytest.raises(errors.Unavailable) as caught:
                await store.get("k", Counter)
            if "no leader" in str(caught.value) or time.monotonic() > give_up:
                break
        assert "no leader" in str(caught.value)
    finally:
        await store.close()
