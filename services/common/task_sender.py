"""Send a task to a node's agent from asyncio and await its outcome without blocking the loop.

Used from grpc.aio handlers. The task message, in Celery's message protocol
(version 2, what `Celery.send_task` sends), is published with kombu alone on a
small thread pool of the sender's own, because kombu's publish is a blocking
socket write (kombu is imported on the first publish: a service that sends no
task does not carry it, some 4.7 MiB); the outcome is awaited with redis.asyncio
(services.common.task_results). No Celery app is built: a service only sends,
and the app with its worker-side modules (click, dateutil, the loaders, the
result and event machinery) cost each service process some 5 MiB. Every task
carries its operation id and a deadline: the caller waits until then, and the
message expires then too, so an agent that comes back late never runs a task
its caller gave up on. A task nobody answers ends as Unavailable naming the
node; a domain error raised on the agent is raised here as the same class with
the same reason. Every task is counted in the sender's `metrics` (sent, outcome,
round trip), which its service adds to its /metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio
import structlog
from google.protobuf.message import Message

from services.common import errors, metrics, task_results, tasks
from services.common.settings import Settings

log = structlog.get_logger(__name__)

# Bounded so a broker outage costs a publish at most about a second before
# the caller hears Unavailable (kombu's default retries for longer).
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.3,
                  "interval_max": 0.5}
BACKGROUND_PRIORITY = 9
"""Message priority of a background task. The Redis transport keeps a list per priority
step and a worker takes from the plain list (no priority) first, so a node's background
work (refreshed filters) never holds up the tasks an operation waits on (a spawn)."""


@dataclass(frozen=True)
class SenderConfig:
    """How a sender reaches the agents' broker and result store."""

    broker_url: str
    """Celery broker URL the agents consume from (Redis)."""
    result_url: str
    """Redis URL of Celery's result backend, where agents store each outcome."""
    publish_threads: int = 4
    """Threads publishing task messages, so the event loop never waits on the broker's socket."""
    connect_timeout: float = 5.0
    """Seconds a connection to Redis may take to open."""

    @classmethod
    def from_settings(cls, settings: Settings) -> SenderConfig:
        """The sender of a service: the same Redis as its agents for broker and results."""
        return cls(broker_url=settings.redis_url, result_url=settings.redis_url)


class TaskPublisher:
    """Publishes Celery task messages onto a node's queue with kombu; blocking, thread-safe.

    Each message is what `Celery.send_task(name, kwargs=..., queue=...)` publishes:
    protocol 2 headers and body, JSON, through the anonymous exchange straight
    onto the queue, which is declared (with its direct exchange of the same name,
    as Celery names a queue it is asked for) once per connection. Up to
    `pool_limit` connections, one per publishing thread, opened from the first
    publish on; a broker out of reach raises ConnectionError.
    """

    def __init__(self, broker_url: str, *, pool_limit: int, connect_timeout: float) -> None:
        self._broker_url = broker_url
        self._pool_limit = pool_limit
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._pools: tuple[Any, Any] | None = None
        """kombu's connection and producer pools, made by the first publish."""
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"

    def _producers(self) -> Any:
        with self._lock:
            if self._pools is None:
                # Imported here: kombu (with amqp, billiard and yaml) only in a
                # process that sends. Its API is untyped.
                from kombu.connection import Connection
                from kombu.pools import ProducerPool

                connections = Connection(  # type: ignore[no-untyped-call]
                    self._broker_url, connect_timeout=self._connect_timeout,
                ).Pool(self._pool_limit)
                producers = ProducerPool(  # type: ignore[no-untyped-call]
                    connections, limit=self._pool_limit)
                self._pools = (connections, producers)
            return self._pools[1]

    def publish(self, name: str, kwargs: dict[str, Any], *, queue: str, task_id: str,
                expires: float, time_limit: float | None, soft_time_limit: float | None,
                priority: int | None = None) -> None:
        """Publish task `name` with `kwargs` onto `queue`; it expires `expires` seconds from now."""
        headers: dict[str, Any] = {
            "lang": "py", "task": name, "id": task_id, "shadow": None, "eta": None,
            # The worker revokes a message it takes after this (aware, as Celery's app.now()).
            "expires": (datetime.now(UTC) + timedelta(seconds=expires)).isoformat(),
            "group": None, "group_index": None, "retries": 0,
            "timelimit": [time_limit, soft_time_limit], "root_id": task_id, "parent_id": None,
            # Shown in the worker's events: the keys only, never a request's fields.
            "argsrepr": "()", "kwargsrepr": "{" + ", ".join(map(repr, kwargs)) + "}",
            "origin": self._origin, "ignore_result": False, "replaced_task_nesting": 0,
            "stamped_headers": None, "stamps": {},
        }
        body = ((), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
        producers = self._producers()
        from kombu.entity import Exchange, Queue
        from kombu.exceptions import OperationalError

        declare = Queue(queue, Exchange(queue, type="direct"),  # type: ignore[no-untyped-call]
                        routing_key=queue)
        extra = {} if priority is None else {"priority": priority}
        try:
            with producers.acquire(block=True) as producer:
                producer.publish(
                    body, exchange="", routing_key=queue, declare=[declare], serializer="json",
                    headers=headers, correlation_id=task_id, reply_to="", delivery_mode=2,
                    retry=True, retry_policy=_PUBLISH_RETRY, **extra,
                )
        except OperationalError as exc:
            raise ConnectionError(f"the task broker is unreachable: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            pools, self._pools = self._pools, None
        if pools is not None:
            connections, producers = pools
            producers.force_close_all()
            connections.force_close_all()


class TaskSender:
    """Sends agent tasks and awaits their outcomes; built from its parts or by `connect`."""

    def __init__(self, publisher: TaskPublisher, waiter: task_results.ResultWaiter,
                 executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._publisher = publisher
        self._waiter = waiter
        self._executor = executor
        self.metrics = metrics.TaskSenderMetrics()
        """Tasks sent, their outcomes and round trips; the service registers them."""

    @classmethod
    async def connect(cls, config: SenderConfig) -> TaskSender:
        """A started sender for `config`; Unavailable if Redis cannot be reached."""
        publisher = TaskPublisher(config.broker_url, pool_limit=config.publish_threads,
                                  connect_timeout=config.connect_timeout)
        client = redis.asyncio.Redis.from_url(config.result_url,
                                              socket_connect_timeout=config.connect_timeout)
        waiter = task_results.ResultWaiter(client)
        await waiter.start()
        executor = concurrent.futures.ThreadPoolExecutor(config.publish_threads,
                                                         thread_name_prefix="task-publish")
        return cls(publisher, waiter, executor)

    async def close(self) -> None:
        await self._waiter.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._publisher.close)

    async def send(
        self,
        node: str,
        spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
        request: tasks.Req,
        *,
        operation_id: tasks.OperationId,
        deadline: float | None = None,
        background: bool = False,
    ) -> tasks.Resp:
        """Run `spec` on `node` and return its response.

        Waits at most `deadline` seconds (the task's own by default), then
        raises Unavailable naming the node; the agent's domain errors are
        raised as they were raised there. A `background` task runs on the
        node after every task without it already queued there.
        """
        if not isinstance(request, spec.request_type):
            raise TypeError(f"{spec.name} takes a {spec.request_type.__name__}, "
                            f"not a {type(request).__name__}")
        wait = spec.deadline if deadline is None else deadline
        loop = asyncio.get_running_loop()
        ends = loop.time() + wait
        task_id = self._waiter.new_task_id()
        pending = self._waiter.expect(task_id)
        with self.metrics.track(spec.name) as track:
            try:
                await self._publish(node, spec, request, operation_id, task_id, wait,
                                    background=background)
                track.sent()
                meta = await self._waiter.outcome(pending, ends - loop.time())
            finally:
                self._waiter.forget(pending)
            track.outcome = _outcome_of(meta)
            if meta is None:
                raise _gone(node, spec, operation_id, wait, started=pending.started)
            return _response(node, spec, operation_id, meta)

    async def _publish(self, node: str, spec: tasks.TaskSpec[Any, Any], request: Message,
                       operation_id: str, task_id: str, wait: float, *,
                       background: bool = False) -> None:
        publish = functools.partial(
            self._publisher.publish, spec.name,
            {tasks.OPERATION_ID: operation_id, tasks.REQUEST: tasks.to_json(request)},
            queue=tasks.queue_name(node), task_id=task_id,
            # Seconds from now: the worker drops the message once the caller gave up.
            expires=wait, time_limit=spec.time_limit, soft_time_limit=spec.soft_time_limit,
            priority=BACKGROUND_PRIORITY if background else None,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, publish)
        except OSError as exc:  # ConnectionError too: the broker is out of reach
            raise errors.Unavailable(
                f"cannot send {spec.name} to node {node}: the task broker is unreachable",
                reason="nubis.agent.broker_unavailable",
                metadata={"node": node, "operation_id": operation_id},
            ) from exc
        log.debug("task sent", task=spec.name, node=node, operation_id=operation_id,
                  task_id=task_id)


def _outcome_of(meta: dict[str, Any] | None) -> str:
    """The metrics outcome of a task's result meta (None: nothing came by the deadline)."""
    if meta is None or meta.get("status") == "REVOKED":
        return metrics.TaskSenderMetrics.TIMEOUT
    result = meta.get("result")
    if meta.get("status") != "SUCCESS" or not isinstance(result, dict):
        return metrics.TaskSenderMetrics.FAULT
    if "error" in result:
        return metrics.TaskSenderMetrics.ERROR
    return metrics.TaskSenderMetrics.OK if "response" in result else metrics.TaskSenderMetrics.FAULT


def _gone(node: str, spec: tasks.TaskSpec[Any, Any], operation_id: str, wait: float, *,
          started: bool) -> errors.Unavailable:
    what = "started but did not finish" if started else "did not answer"
    return errors.Unavailable(
        f"node {node} {what} {spec.name} within {wait:g}s (operation {operation_id})",
        reason="nubis.agent.unavailable",
        metadata={"node": node, "task": spec.name, "operation_id": operation_id},
    )


def _response(node: str, spec: tasks.TaskSpec[Any, tasks.Resp], operation_id: str,
              meta: dict[str, Any]) -> tasks.Resp:
    status = meta.get("status")
    if status == "SUCCESS":
        return tasks.outcome_response(spec, meta.get("result"), node)
    if status == "REVOKED":
        # The message expired before an agent took it: the caller's deadline passed.
        raise errors.Unavailable(
            f"node {node} took {spec.name} only after its deadline (operation {operation_id})",
            reason="nubis.agent.unavailable",
            metadata={"node": node, "task": spec.name, "operation_id": operation_id},
        )
    # Not a domain error: a fault of the agent; its traceback is in the agent's log.
    result = meta.get("result")
    kind = result.get("exc_type", "error") if isinstance(result, dict) else "error"
    log.error("agent task failed", task=spec.name, node=node, operation_id=operation_id,
              error=kind)
    raise errors.NubisError(
        f"{spec.name} failed on node {node} ({kind}, operation {operation_id})",
        reason="nubis.agent.task_failed",
        metadata={"node": node, "task": spec.name, "operation_id": operation_id},
    )
