"""The phase wrapper counts every task run by outcome: ok, a domain error by class, a fault.

Tasks written for the test run through `phases.run` with metrics of their own
registry; the counts, latency observations and in-flight gauge are read back
from that registry.
"""

from __future__ import annotations

import time

import prometheus_client
import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import metrics as agent_metrics
from services.agent.tasks import phases
from services.common import errors, tasks

SPEC = tasks.TaskSpec("nubis.test.metered", tasks_pb2.PingRequest, tasks_pb2.PingResponse,
                      time_limit=10, soft_time_limit=5, deadline=10, retries=0)


class Metered(phases.AgentTask[tasks_pb2.PingRequest, tasks_pb2.PingResponse]):
    """Raises `error` if given (after reading the in-flight gauge), else answers pong."""

    spec = SPEC

    def __init__(self, metrics: agent_metrics.TaskMetrics,
                 error: Exception | None = None) -> None:
        self.metrics = metrics
        self.error = error
        self.in_flight_seen = -1.0

    def execute(self, request: tasks_pb2.PingRequest,
                ctx: phases.Context) -> tasks_pb2.PingResponse:
        self.in_flight_seen = _value(self.metrics, "nubis_agent_tasks_in_flight", task=SPEC.name)
        if self.error is not None:
            raise self.error
        return tasks_pb2.PingResponse(node=ctx.node, status="pong")


def _value(metrics: agent_metrics.TaskMetrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def _run(metrics: agent_metrics.TaskMetrics, error: Exception | None = None) -> Metered:
    task = Metered(metrics, error)
    ctx = phases.Context(node="n1", operation_id=tasks.OperationId("op-1"), task_id="t-1",
                         deadline=time.time() + 10)
    phases.run(task, ctx, {}, phases.Locks(), metrics)
    return task


def test_each_outcome_is_counted_with_its_latency() -> None:
    metrics = agent_metrics.TaskMetrics(prometheus_client.CollectorRegistry())
    running = _run(metrics)
    _run(metrics, errors.NotFound("no such domain"))
    _run(metrics, errors.NotFound("no such domain"))
    with pytest.raises(RuntimeError):
        _run(metrics, RuntimeError("a bug"))

    total = "nubis_agent_tasks_total"
    assert _value(metrics, total, task=SPEC.name, outcome="ok", error="") == 1
    assert _value(metrics, total, task=SPEC.name, outcome="error", error="NotFound") == 2
    assert _value(metrics, total, task=SPEC.name, outcome="fault", error="") == 1
    for outcome, count in (("ok", 1), ("error", 2), ("fault", 1)):
        assert _value(metrics, "nubis_agent_task_duration_seconds_count", task=SPEC.name,
                      outcome=outcome) == count
    assert running.in_flight_seen == 1
    assert _value(metrics, "nubis_agent_tasks_in_flight", task=SPEC.name) == 0

