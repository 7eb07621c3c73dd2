"""The power sync against real agents: what a node's libvirt runs is what the records say.

Domains are shut off or destroyed behind compute's back (tasks sent straight
to the agent), or lost with a restarted agent (the test driver keeps its
domains in the agent's memory: a rebooted, empty host); the sync must bring
every idle record to the truth, never leave one ACTIVE without a domain, and
never destroy a domain it does not know.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from nubis.agent.v1 import tasks_pb2
from nubis.compute.v1 import instance_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import make_channel
from services.common import tasks
from services.compute import keys
from tests.functional.compute.power_harness import (
    NODES,
    SYNC_INTERVAL,
    PowerCloud,
    power_cloud,
    wait_for,
)

__all__ = ["power_cloud"]

Instance = instance_pb2.Instance
MISSING = "nubis.instance.domain_missing"
ROUNDS = 6 * SYNC_INTERVAL
"""Long enough for several sync rounds."""


async def _behind_nubis(cloud: PowerCloud, node: str, spec: tasks.TaskSpec[tasks.Req, Any],
                        request: tasks.Req) -> None:
    await cloud.sender.send(node, spec, request, operation_id=tasks.new_operation_id())


async def test_a_domain_shut_off_behind_nubis_makes_its_instance_stopped(
        power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    made = await cloud.instance(NODES[0])
    await _behind_nubis(cloud, NODES[0], tasks.POWER_OFF,
                        tasks_pb2.PowerOffRequest(name=made.domain_name, timeout_seconds=0))
    stopped = await cloud.until(made.meta.id, lambda i: i.state != Instance.ACTIVE)
    assert (stopped.state, stopped.power_state) == (Instance.STOPPED,
                                                    Instance.POWER_STATE_SHUTDOWN)
    assert not stopped.HasField("fault")


async def test_a_destroyed_domain_makes_its_instance_error_with_the_reason(
        power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    made = await cloud.instance(NODES[0])
    await _behind_nubis(cloud, NODES[0], tasks.DESTROY,
                        tasks_pb2.DestroyRequest(name=made.domain_name))
    failed = await cloud.until(made.meta.id, lambda i: i.state != Instance.ACTIVE)
    assert failed.state == Instance.ERROR
    assert failed.power_state == Instance.POWER_STATE_NOSTATE
    assert failed.fault.reason == MISSING
    assert failed.fault.message.startswith(
        f"domain {made.domain_name} is gone from node {NODES[0]}")
    shown = await cloud.get(made.meta.id, "a_member")
    assert shown.fault.reason == MISSING and not shown.node


async def _node_state(cloud: PowerCloud, node: str) -> int:
    channel = make_channel(cloud.scheduler.running.address)
    try:
        found = await scheduler_pb2_grpc.SchedulerServiceStub(channel).GetNode(
            scheduler_pb2.GetNodeRequest(name=node), metadata=cloud.as_("cloud_admin"))
        return int(found.state)
    finally:
        await channel.close()


async def test_a_restarted_agent_leaves_its_instances_in_error_never_active(
        power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    lost = [await cloud.instance(NODES[1]) for _ in range(2)]
    stopped = await cloud.instance(NODES[1], state=Instance.STOPPED)
    kept = await cloud.instance(NODES[0])
    cloud.stop_agent(NODES[1])

    async def down() -> bool:
        return await _node_state(cloud, NODES[1]) == scheduler_pb2.NODE_STATE_DOWN

    await wait_for(down, 30)
    await asyncio.sleep(ROUNDS)  # a DOWN node is skipped: its records stay as they were
    for made in (*lost, stopped):
        found = await cloud.get(made.meta.id)
        assert (found.state, found.power_state) == (made.state, made.power_state)

    cloud.start_agent(NODES[1])  # the test driver comes back with no domains
    for made in (*lost, stopped):
        failed = await cloud.until(made.meta.id, lambda i: i.state == Instance.ERROR, 60)
        assert failed.fault.reason == MISSING
        assert f"is gone from node {NODES[1]}" in failed.fault.message
    assert (await cloud.get(kept.meta.id)).state == Instance.ACTIVE
    assert await cloud.domain(NODES[0], kept.meta.id) is not None


async def test_unknown_domains_are_counted_and_left_running(power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    registry = cloud.compute.running.registry
    labels = {"node": NODES[0], "kind": "unknown"}

    def count() -> float | None:
        return registry.get_sample_value("nubis_compute_unmanaged_domains", labels)

    async def synced() -> bool:
        return count() is not None

    await wait_for(synced, 10)
    before = count()  # the test driver's own "test" domain is one nubis does not know
    assert before is not None
    stranger = str(uuid.uuid4())  # a domain of no instance nubis has
    await cloud.spawn(NODES[0], stranger)

    async def counted() -> bool:
        return count() == before + 1

    await wait_for(counted, 10)
    await asyncio.sleep(ROUNDS)
    domain = await cloud.domain(NODES[0], stranger)
    assert domain is not None and domain.state == "running"
    assert await cloud.store.find(keys.instance(stranger), Instance) is None


async def test_busy_and_stopped_instances_are_not_overruled(power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    # An operation in flight owns its record, even with no domain on the node yet.
    busy = await cloud.instance(NODES[0], spawn=False)
    found = await cloud.store.get(keys.instance(busy.meta.id), Instance)
    found.value.task_id = str(uuid.uuid4())
    found.value.task_state = Instance.TASK_STATE_POWERING_ON
    await cloud.store.replace(keys.instance(busy.meta.id), found.value,
                              expect_revision=found.mod_revision)
    # A STOPPED instance whose domain runs is recorded as running, not powered off.
    running = await cloud.instance(NODES[0])
    record = await cloud.store.get(keys.instance(running.meta.id), Instance)
    record.value.state = Instance.STOPPED
    record.value.power_state = Instance.POWER_STATE_SHUTDOWN
    await cloud.store.replace(keys.instance(running.meta.id), record.value,
                              expect_revision=record.mod_revision)
    synced = await cloud.until(running.meta.id,
                               lambda i: i.power_state == Instance.POWER_STATE_RUNNING)
    assert synced.state == Instance.STOPPED
    domain = await cloud.domain(NODES[0], running.meta.id)
    assert domain is not None and domain.state == "running"
    left = await cloud.get(busy.meta.id)
    assert (left.state, left.task_state) == (Instance.ACTIVE, Instance.TASK_STATE_POWERING_ON)


async def test_a_record_that_does_not_decode_stops_no_round(power_cloud: PowerCloud) -> None:
    cloud = power_cloud
    await cloud.store.create(keys.instance(str(uuid.uuid4())),
                             tasks_pb2.DomainStatus(name="not an instance"))
    made = await cloud.instance(NODES[0])
    await _behind_nubis(cloud, NODES[0], tasks.DESTROY,
                        tasks_pb2.DestroyRequest(name=made.domain_name))
    failed = await cloud.until(made.meta.id, lambda i: i.state == Instance.ERROR)
    assert failed.fault.reason == MISSING
