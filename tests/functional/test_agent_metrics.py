"""An agent's /metrics over HTTP: its tasks counted by name and outcome, with their latency.

A real agent (subprocess, libvirt test driver) given a metrics port answers a
ping and refuses a domain_status without a name (InvalidArgument); its
/metrics then shows one ok ping and one InvalidArgument error, each with a
latency observation, and nothing in flight.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import pytest
from nubis.agent.v1 import tasks_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.client.lab import daemons
from services.common import errors, tasks
from services.common.task_sender import TaskSender
from tests.functional import agent_harness


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def _ping(sender: TaskSender, node: str, within: float) -> None:
    """Ping `node` until it answers (it consumes once its node is settled)."""
    ends = asyncio.get_running_loop().time() + within
    while True:
        try:
            await sender.send(node, tasks.PING, tasks_pb2.PingRequest(),
                              operation_id=tasks.new_operation_id(), deadline=5)
            return
        except errors.Unavailable:
            if asyncio.get_running_loop().time() > ends:
                raise


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_agent_metrics_count_ok_and_error_tasks(
    agents: agent_harness.AgentLauncher, sender: TaskSender,
) -> None:
    node = f"metrics-{uuid.uuid4().hex[:6]}"
    port = daemons.free_port()
    agents.start(node, env={"NUBIS_AGENT__METRICS_PORT": str(port)})
    await _ping(sender, node, within=40)
    with pytest.raises(errors.InvalidArgument):
        await sender.send(node, tasks.DOMAIN_STATUS, tasks_pb2.DomainStatusRequest(name=""),
                          operation_id=tasks.new_operation_id(), deadline=15)

    samples = await asyncio.to_thread(_samples, port)
    ok = (("error", ""), ("outcome", "ok"), ("task", tasks.PING.name))
    refused = (("error", "InvalidArgument"), ("outcome", "error"),
               ("task", tasks.DOMAIN_STATUS.name))
    assert samples[("nubis_agent_tasks_total", ok)] >= 1
    assert samples[("nubis_agent_tasks_total", refused)] == 1
    for task, outcome in ((tasks.PING.name, "ok"), (tasks.DOMAIN_STATUS.name, "error")):
        labels = (("outcome", outcome), ("task", task))
        count = samples[("nubis_agent_task_duration_seconds_count", labels)]
        total = samples[("nubis_agent_task_duration_seconds_sum", labels)]
        assert count >= 1 and 0 < total < 10 * count
    assert samples[("nubis_agent_tasks_in_flight", (("task", tasks.PING.name),))] == 0
    assert not any(name == "nubis_agent_tasks_total" and ("outcome", "fault") in labels
                   for name, labels in samples)
