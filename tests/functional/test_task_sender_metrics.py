"""The task sender's Prometheus metrics, from tasks sent to a real agent over real Redis.

A ping answered, a domain error raised on the agent, a task to a node nobody serves (its
deadline passes) and a task whose broker cannot be reached: each is counted under its task
name with its outcome and its round trip, and nothing is left awaiting.
"""

from __future__ import annotations

import uuid

import prometheus_client
import pytest
from nubis.agent.v1 import tasks_pb2

from services.client.lab import daemons
from services.common import errors, tasks
from services.common.task_sender import SenderConfig, TaskSender
from tests.conftest import RedisEndpoint
from tests.functional import agent_harness

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def _value(registry: prometheus_client.CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_sent_outcomes_and_round_trips_by_task(
    agents: agent_harness.AgentLauncher, sender: TaskSender,
) -> None:
    registry = prometheus_client.CollectorRegistry()
    sender.metrics.register(registry)
    node = f"metrics-{uuid.uuid4().hex[:6]}"
    agents.start(node)
    for _ in range(2):
        await sender.send(node, tasks.PING, tasks_pb2.PingRequest(),
                          operation_id=tasks.new_operation_id(), deadline=30)
    with pytest.raises(errors.NotFound):
        await sender.send(node, tasks.DOMAIN_STATUS, tasks_pb2.DomainStatusRequest(name="nope"),
                          operation_id=tasks.new_operation_id())
    with pytest.raises(errors.Unavailable):
        await sender.send(f"gone-{node}", tasks.PING, tasks_pb2.PingRequest(),
                          operation_id=tasks.new_operation_id(), deadline=0.5)

    ping, status = tasks.PING.name, tasks.DOMAIN_STATUS.name
    assert _value(registry, "nubis_task_sender_sent_total", task=ping) == 3
    assert _value(registry, "nubis_task_sender_sent_total", task=status) == 1
    assert _value(registry, "nubis_task_sender_outcomes_total", task=ping, outcome="ok") == 2
    assert _value(registry, "nubis_task_sender_outcomes_total", task=ping,
                  outcome="timeout") == 1
    assert _value(registry, "nubis_task_sender_outcomes_total", task=status,
                  outcome="error") == 1
    assert _value(registry, "nubis_task_sender_duration_seconds_count", task=ping,
                  outcome="ok") == 2
    # The timed-out ping waited out its deadline.
    assert _value(registry, "nubis_task_sender_duration_seconds_sum", task=ping,
                  outcome="timeout") >= 0.5
    assert _value(registry, "nubis_task_sender_awaiting", task=ping) == 0
    assert _value(registry, "nubis_task_sender_awaiting", task=status) == 0


async def test_a_broker_out_of_reach_is_unreachable_and_nothing_sent(
    redis: RedisEndpoint,
) -> None:
    sender = await TaskSender.connect(SenderConfig(
        broker_url=f"redis://127.0.0.1:{daemons.free_port()}/0", result_url=redis.url,
        connect_timeout=0.5))
    try:
        registry = prometheus_client.CollectorRegistry()
        sender.metrics.register(registry)
        with pytest.raises(errors.Unavailable, match="broker"):
            await sender.send("anywhere", tasks.PING, tasks_pb2.PingRequest(),
                              operation_id=tasks.new_operation_id(), deadline=10)
    finally:
        await sender.close()
    ping = tasks.PING.name
    assert _value(registry, "nubis_task_sender_sent_total", task=ping) == 0
    assert _value(registry, "nubis_task_sender_outcomes_total", task=ping,
                  outcome="unreachable") == 1
    assert _value(registry, "nubis_task_sender_awaiting", task=ping) == 0
