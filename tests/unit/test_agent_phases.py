"""The phase wrapper every agent task runs through, on tasks written for the test.

Transient libvirt errors are retried with backoff while retries and the
deadline allow; a domain error becomes the contract's error outcome and a bug
is raised; every contract task is registered on the agent's Celery app.
"""

from __future__ import annotations

import time

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import app as app_module
from services.agent import driver as driver_module
from services.agent import tasks as agent_tasks
from services.agent.tasks import phases
from services.common import errors, tasks
from services.common.settings import Settings

FLAKY = tasks.TaskSpec("nubis.test.flaky", tasks_pb2.PingRequest, tasks_pb2.PingResponse,
                       time_limit=10, soft_time_limit=5, deadline=10, retries=3)


class Flaky(phases.AgentTask[tasks_pb2.PingRequest, tasks_pb2.PingResponse]):
    """Its prerequisite check meets `failures` transient errors, then the task runs."""

    spec = FLAKY

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or errors.Unavailable("libvirt restarting")
        self.checks = 0
        self.runs = 0

    def check_prerequisites(self, request: tasks_pb2.PingRequest,
                            ctx: phases.Context) -> tasks_pb2.PingResponse | None:
        self.checks += 1
        if self.checks <= self.failures:
            raise self.error
        return None

    def execute(self, request: tasks_pb2.PingRequest,
                ctx: phases.Context) -> tasks_pb2.PingResponse:
        self.runs += 1
        return tasks_pb2.PingResponse(node=ctx.node, status="pong")


def _ctx(deadline_in: float = 10.0) -> phases.Context:
    return phases.Context(node="n1", operation_id=tasks.OperationId("op-1"), task_id="t-1",
                          deadline=time.time() + deadline_in)


def test_transient_errors_are_retried_until_the_task_runs() -> None:
    task = Flaky(failures=2)
    outcome = phases.run(task, _ctx(), {}, phases.Locks())
    assert tasks.outcome_response(FLAKY, outcome, "n1").status == "pong"
    assert (task.checks, task.runs) == (3, 1)


def test_retries_end_with_unavailable() -> None:
    task = Flaky(failures=10)
    outcome = phases.run(task, _ctx(), {}, phases.Locks())
    with pytest.raises(errors.Unavailable, match="libvirt restarting"):
        tasks.outcome_response(FLAKY, outcome, "n1")
    assert (task.checks, task.runs) == (FLAKY.retries + 1, 0)


def test_no_retry_outlives_the_deadline() -> None:
    task = Flaky(failures=10)
    outcome = phases.run(task, _ctx(deadline_in=0.0), {}, phases.Locks())
    assert outcome["error"]["kind"] == "Unavailable"
    assert task.checks == 1


def test_other_domain_errors_are_not_retried() -> None:
    task = Flaky(failures=1, error=errors.FailedPrecondition("pool is full", reason="x.full"))
    outcome = phases.run(task, _ctx(), {}, phases.Locks())
    with pytest.raises(errors.FailedPrecondition) as caught:
        tasks.outcome_response(FLAKY, outcome, "n1")
    assert caught.value.reason == "x.full" and caught.value.metadata["node"] == "n1"
    assert task.checks == 1


def test_a_bug_fails_the_task() -> None:
    with pytest.raises(KeyError):
        phases.run(Flaky(failures=1, error=KeyError("bug")), _ctx(), {}, phases.Locks())


def test_a_request_that_is_not_the_message_is_invalid() -> None:
    outcome = phases.run(Flaky(failures=0), _ctx(), ["not", "an", "object"], phases.Locks())
    with pytest.raises(errors.InvalidArgument) as caught:
        tasks.outcome_response(FLAKY, outcome, "n1")
    assert [v.field for v in caught.value.violations] == [tasks.REQUEST]


def test_every_contract_task_is_registered_on_the_agent() -> None:
    app = app_module.make_app(Settings(), "n1")
    driver = driver_module.Driver("test:///default")
    agent_tasks.register_all(app, driver, "n1")
    assert set(tasks.SPECS) <= set(app.tasks)
    for name, spec in tasks.SPECS.items():
        assert app.tasks[name].time_limit == spec.time_limit
    driver.close()
