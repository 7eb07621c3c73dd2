"""The one way an agent task runs: Ganeti's phases, a lock, and backoff on transient libvirt errors.

check arguments (the request alone) → lock (the object the task touches) →
check prerequisites (reads libvirt, no side effects; may find the work done
already, which makes a redelivered task a no-op) → execute. A transient
libvirt error (Unavailable) in the last two phases runs them again after a
backoff, still under the lock, while the task's retries and its caller's
deadline allow. The outcome is the contract's: the response, or the domain
error; anything else is a fault, logged with its traceback and left to fail
the Celery task.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic

import structlog
from celery import Celery

from services.agent import metrics as agent_metrics
from services.common import errors, tasks

log = structlog.get_logger(__name__)

_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0


@dataclass(frozen=True)
class Context:
    """What a running task knows besides its request."""

    node: str
    operation_id: tasks.OperationId
    task_id: str
    deadline: float
    """Wall-clock time (time.time()) after which nobody waits for the outcome."""


class AgentTask(Generic[tasks.Req, tasks.Resp]):
    """One task of the contract, written as phases; subclasses set `spec` and `execute`."""

    spec: tasks.TaskSpec[tasks.Req, tasks.Resp]

    def check_arguments(self, request: tasks.Req) -> None:
        """Reject a malformed request (InvalidArgument); no libvirt here."""

    def lock_key(self, request: tasks.Req) -> str:
        """The object the task changes, so two tasks on it run one after the other; "" for none."""
        return ""

    def check_prerequisites(self, request: tasks.Req, ctx: Context) -> tasks.Resp | None:
        """Read the node's state: raise if the task cannot run, or return the response if done."""
        return None

    def execute(self, request: tasks.Req, ctx: Context) -> tasks.Resp:
        raise NotImplementedError


class Locks:
    """One lock per object key, shared by the worker threads of the agent."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, key: str, deadline: float) -> Iterator[None]:
        """Hold `key` (nothing for ""); Unavailable if it stays taken until `deadline`."""
        if not key:
            yield
            return
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(timeout=max(deadline - time.time(), 0.0)):
            raise errors.Unavailable(f"{key} stayed busy with another task until the deadline",
                                     reason="nubis.agent.busy", metadata={"object": key})
        try:
            yield
        finally:
            lock.release()


def run(task: AgentTask[Any, Any], ctx: Context, payload: object, locks: Locks,
        metrics: agent_metrics.TaskMetrics = agent_metrics.TASKS) -> dict[str, Any]:
    """Run `task` through its phases; the contract's outcome of a response or a domain error.

    Each run is counted in `metrics` by its outcome (ok, error, fault), with its latency.
    """
    name = task.spec.name
    bound = log.bind(task=name, operation_id=ctx.operation_id, task_id=ctx.task_id)
    started = time.monotonic()
    try:
        with metrics.in_flight.labels(task=name).track_inprogress():
            request = tasks.from_json(task.spec.request_type, payload, tasks.REQUEST)
            task.check_arguments(request)
            with locks.hold(task.lock_key(request), ctx.deadline):
                response = _attempts(task, request, ctx, bound)
    except errors.NubisError as exc:
        bound.info("task refused", error=type(exc).__name__, reason=exc.reason,
                   message=exc.message)
        metrics.observe(name, agent_metrics.ERROR, time.monotonic() - started,
                        type(exc).__name__)
        return tasks.error_outcome(exc)
    except Exception:
        bound.exception("task failed")
        metrics.observe(name, agent_metrics.FAULT, time.monotonic() - started)
        raise
    metrics.observe(name, agent_metrics.OK, time.monotonic() - started)
    return tasks.response_outcome(response)


def _attempts(task: AgentTask[Any, Any], request: Any, ctx: Context,
              bound: structlog.typing.FilteringBoundLogger) -> Any:
    backoff = _FIRST_BACKOFF
    attempt = 0
    while True:
        try:
            done = task.check_prerequisites(request, ctx)
            return done if done is not None else task.execute(request, ctx)
        except errors.Unavailable as exc:
            # Full jitter, so tasks failing together do not come back together.
            pause = random.uniform(0, backoff)
            if attempt >= task.spec.retries or time.time() + pause >= ctx.deadline:
                raise
            attempt += 1
            bound.warning("transient libvirt error; retrying", attempt=attempt,
                          error=exc.message, pause=round(pause, 3))
            time.sleep(pause)
            backoff = min(backoff * 2, _MAX_BACKOFF)


def register(app: Celery, task: AgentTask[Any, Any], node: str, locks: Locks) -> None:
    """Add `task` to `app` under its contract name and limits."""
    spec = task.spec

    def celery_task(self: Any, operation_id: str = "", request: object = None) -> dict[str, Any]:
        ctx = Context(
            node=node,
            # A caller outside the contract (a bare send_task) still gets a traceable id.
            operation_id=tasks.OperationId(operation_id or str(self.request.id)),
            task_id=str(self.request.id),
            deadline=_deadline(self.request.expires, spec),
        )
        return run(task, ctx, request, locks)

    celery_task.__name__ = spec.name.rsplit(".", 1)[-1]
    celery_task.__doc__ = type(task).__doc__
    app.task(name=spec.name, bind=True, time_limit=spec.time_limit,
             soft_time_limit=spec.soft_time_limit)(celery_task)


def _deadline(expires: object, spec: tasks.TaskSpec[Any, Any]) -> float:
    """When the caller stops waiting: the message's expiry, else the task's own time limit."""
    if isinstance(expires, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(expires).timestamp()
    if isinstance(expires, datetime):
        return expires.timestamp()
    return time.time() + spec.time_limit
