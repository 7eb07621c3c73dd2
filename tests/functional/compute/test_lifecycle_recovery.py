"""A power operation outlives the compute replica that began it: a restarted one adopts it and
runs it again from its record (the agent's tasks are idempotent), to the same outcome."""

from __future__ import annotations

import asyncio
import os
import signal

from nubis.compute.v1 import instance_action_pb2, instance_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V

from services.compute import keys
from services.compute.operation import Operation
from tests.functional.compute.harness import ComputeCloud, bare_cloud

__all__ = ["bare_cloud"]

Instance = instance_pb2.Instance


async def _settled(cloud: ComputeCloud, instance_id: str, within: float = 60.0) -> Instance:
    async with asyncio.timeout(within):
        while True:
            found = await cloud.get(instance_id)
            assert found is not None
            if not found.task_id:
                return found
            await asyncio.sleep(0.2)


async def _stop_action(cloud: ComputeCloud,
                       instance_id: str) -> instance_action_pb2.InstanceAction:
    actions = await cloud.stub().ListInstanceActions(
        instance_action_pb2.ListInstanceActionsRequest(instance_id=instance_id),
        metadata=cloud.admin)
    return actions.actions[0]


async def _sending(cloud: ComputeCloud, instance_id: str) -> None:
    """Until the stop's handler has recorded its step (it sends the agent task next)."""
    async with asyncio.timeout(10):
        while True:
            if (await _stop_action(cloud, instance_id)).events:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and published it


async def test_a_stop_in_flight_when_compute_is_killed_is_finished_by_the_next_one(
        bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    made = await cloud.create()
    booted = await cloud.wait_final(made.meta.id)
    assert booted.state == Instance.ACTIVE
    [agent] = [d for d in cloud.base.agents.started if d.name == f"agent-{booted.node}"]
    os.killpg(agent.pid, signal.SIGSTOP)  # the node gets the task but answers nothing yet
    try:
        stopping = await cloud.stub().StopInstance(
            V.StopInstanceRequest(id=made.meta.id, timeout_seconds=5), metadata=cloud.admin)
        assert stopping.task_state == Instance.TASK_STATE_POWERING_OFF
        await _sending(cloud, made.meta.id)
        cloud.kill(first)  # SIGKILL: the operation stays recorded, its replica gone
        cloud.start_compute_process()
        await asyncio.sleep(1)
    finally:
        os.killpg(agent.pid, signal.SIGCONT)

    stopped = await _settled(cloud, made.meta.id)
    assert (stopped.state, stopped.power_state) == (Instance.STOPPED,
                                                    Instance.POWER_STATE_SHUTDOWN)
    assert await cloud.domain_state(booted.node, made.meta.id) == "shutoff"
    assert await cloud.base.store.find(keys.operation(made.meta.id), Operation) is None
    stop = await _stop_action(cloud, made.meta.id)
    assert (stop.action, stop.state) == ("stop", instance_action_pb2.InstanceAction.SUCCEEDED)
    # Run twice: by the killed replica, then again by the one that adopted it.
    assert [event.name for event in stop.events] == ["compute_stop_instance"] * 2
