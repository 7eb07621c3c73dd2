"""Real node agents (subprocesses on the libvirt test driver) seen by a real scheduler.

An agent publishes its node under a lease and consumes `node.<name>`; when it is
killed the node goes DOWN within the lease TTL (+2 s) and is never chosen; when
it restarts the node is UP again with the same identity. A second agent given
a node name that a live agent holds refuses to start.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
from celery import Celery
from nubis.scheduler.v1 import scheduler_pb2

from services.common import tasks
from services.common.store import Store
from services.scheduler import keys
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness
from tests.functional import scheduler_harness as harness

LEASE_TTL = agent_harness.LEASE_TTL


def ping(redis_url: str, queue: str) -> dict[str, str]:
    """A ping sent as any Celery client would, outside the contract's sender."""
    client = Celery("nubis-test", broker=redis_url, backend=redis_url, set_as_current=False)
    try:
        result = client.send_task(tasks.PING.name, queue=queue)
        outcome = result.get(timeout=30)
        reply: dict[str, str] = outcome["response"]
        return reply
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_agents_publish_consume_die_and_return(
    etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str, agents: agent_harness.AgentLauncher,
    store: Store,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    first, second = f"a-{suffix}", f"b-{suffix}"
    agent = agents.start(first)
    agents.start(second)
    replica = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    try:
        async def node(name: str) -> scheduler_pb2.Node | None:
            view = replica.cache.view(name)
            if view is None:
                return None
            return await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name=name))

        async def state_is(name: str, state: int) -> bool:
            found = await node(name)
            return found is not None and found.state == state and bool(found.id)

        await harness.wait_for(lambda: state_is(first, scheduler_pb2.NODE_STATE_UP), 30)
        await harness.wait_for(lambda: state_is(second, scheduler_pb2.NODE_STATE_UP), 30)
        up = await node(first)
        assert up is not None
        assert (up.capacity.vcpus, up.capacity.memory_mb, up.capacity.disk_gb) == (16, 3072, 100)
        assert up.hypervisor_type == "TEST" and up.queue == f"node.{first}"
        assert "CUSTOM_LAB" in up.traits and up.availability_zone == "nova"

        reply = await asyncio.to_thread(ping, redis.url, f"node.{first}")
        assert reply == {"node": first, "status": "pong"}

        agent.kill()
        killed = time.monotonic()
        await harness.wait_for(
            lambda: state_is(first, scheduler_pb2.NODE_STATE_DOWN), LEASE_TTL + 2)
        assert time.monotonic() - killed <= LEASE_TTL + 2
        for _ in range(4):
            chosen = await replica.stub.SelectDestinations(
                scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
                    resources=scheduler_pb2.Resources(vcpus=1, memory_mb=128, disk_gb=1),
                    consumer_ids=[str(uuid.uuid4())])))
            assert chosen.destinations[0].node_name == second

        agents.start(first)
        await harness.wait_for(lambda: state_is(first, scheduler_pb2.NODE_STATE_UP), 30)
        back = await node(first)
        assert back is not None and back.id == up.id
        reply = await asyncio.to_thread(ping, redis.url, f"node.{first}")
        assert reply["node"] == first

        # Losing the key (an expired lease, an operator's mistake) is repaired
        # by the running agent itself.
        await store.delete(keys.node_report(first))

        async def republished() -> bool:
            return await store.find(keys.node_report(first), scheduler_pb2.NodeReport) is not None
        await harness.wait_for(republished, LEASE_TTL)
    finally:
        await replica.stop()


async def _lease_of(store: Store, name: str) -> int:
    found = await store.find(keys.node_report(name), scheduler_pb2.NodeReport)
    return found.lease if found is not None else 0


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_second_agent_with_the_same_name_refuses(
    redis: RedisEndpoint, agents: agent_harness.AgentLauncher, store: Store,
) -> None:
    name = f"dup-{uuid.uuid4().hex[:6]}"
    owner = agents.start(name)

    async def published() -> bool:
        return await _lease_of(store, name) != 0
    await harness.wait_for(published, 30)
    held_by = await _lease_of(store, name)

    duplicate = agents.start(name)
    try:
        status = await asyncio.to_thread(duplicate.proc.wait, 2 * LEASE_TTL + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the duplicate is still running:\n{duplicate.log_path.read_text()}")
    assert status == 1
    log = duplicate.log_path.read_text()
    assert "node name already in use" in log and name in log and "Traceback" not in log
    assert await _lease_of(store, name) == held_by
    reply = await asyncio.to_thread(ping, redis.url, f"node.{name}")
    assert reply == {"node": name, "status": "pong"}

    # A successor of a crashed agent waits out the dead lease, then takes over.
    owner.kill()
    successor = agents.start(name)

    async def taken_over() -> bool:
        return await _lease_of(store, name) not in (0, held_by)
    await harness.wait_for(taken_over, LEASE_TTL + 30)
    assert successor.alive()
