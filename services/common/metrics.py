"""Prometheus metrics of one gRPC server: per-RPC count by method and code, latency, in flight;
and those of a service's task sender (agent tasks sent, their outcomes and round trips).

Each server owns its own CollectorRegistry (never the process-global one), so
several servers in one process (tests, an all-in-one lab) keep separate counts.
`serve_http` exposes a registry on ``/metrics`` of a port of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import prometheus_client

# Buckets in seconds: control-plane RPCs are mostly milliseconds, a few (a
# claim under contention, a slow etcd) take seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    """The RPC metrics of one server, in a registry of its own."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.handled = prometheus_client.Counter(
            "nubis_rpc_handled",
            "RPCs completed, by full method name and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            "nubis_rpc_duration_seconds",
            "Time from the start of an RPC to its status, by full method name.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = prometheus_client.Gauge(
            "nubis_rpc_in_flight",
            "RPCs being served right now.",
            registry=self.registry,
        )
        self._handled: dict[tuple[str, str], prometheus_client.Counter] = {}
        self._latency: dict[str, prometheus_client.Histogram] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC (each method's and code's series looked up once)."""
        handled = self._handled.get((method, code))
        if handled is None:
            handled = self._handled[(method, code)] = self.handled.labels(method=method,
                                                                           code=code)
        latency = self._latency.get(method)
        if latency is None:
            latency = self._latency[method] = self.latency.labels(method=method)
        handled.inc()
        latency.observe(seconds)


# Buckets in seconds of an agent task's round trip: a ping takes milliseconds, a spawn or an
# image fetch minutes.
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0)


class HasRegistry(Protocol):
    """A running server (services.common.server.RunningServer) and its registry."""

    registry: prometheus_client.CollectorRegistry


class TaskSenderMetrics:
    """What one task sender sent and heard back, by task name; registered by its service.

    Outcomes: `ok` (a response), `error` (a domain error of the agent's), `fault` (the
    task failed on the agent, or answered nothing usable), `timeout` (no outcome by the
    caller's deadline, or the message expired before an agent took it), `unreachable`
    (the broker took no message: nothing was sent) and `cancelled` (the caller stopped
    waiting, e.g. its RPC was cancelled).
    """

    OK, ERROR, FAULT, TIMEOUT, UNREACHABLE = "ok", "error", "fault", "timeout", "unreachable"
    CANCELLED = "cancelled"

    def __init__(self) -> None:
        self.sent = prometheus_client.Counter(
            "nubis_task_sender_sent", "Agent tasks published to a node's queue, by task name.",
            ["task"], registry=None)
        self.outcomes = prometheus_client.Counter(
            "nubis_task_sender_outcomes",
            "Agent tasks awaited to their end, by task name and outcome.",
            ["task", "outcome"], registry=None)
        self.latency = prometheus_client.Histogram(
            "nubis_task_sender_duration_seconds",
            "Time from sending an agent task to its outcome, by task name and outcome.",
            ["task", "outcome"], buckets=TASK_BUCKETS, registry=None)
        self.awaiting = prometheus_client.Gauge(
            "nubis_task_sender_awaiting", "Agent tasks sent and not answered yet, by task name.",
            ["task"], registry=None)

    def register(self, registry: prometheus_client.CollectorRegistry) -> None:
        for collector in (self.sent, self.outcomes, self.latency, self.awaiting):
            registry.register(collector)

    async def expose(self, running: HasRegistry) -> None:
        """A service's background job: add these metrics to its server's registry."""
        self.register(running.registry)

    def track(self, task: str) -> TaskTrack:
        """The record of one task from its send to its outcome (a context manager)."""
        return TaskTrack(self, task)


class TaskTrack:
    """One task on its way: `sent()` once published, `outcome` set once known; leaving the
    block records it (an exception before `sent()` is `unreachable`, after it `fault`)."""

    def __init__(self, metrics: TaskSenderMetrics, task: str) -> None:
        self._metrics, self._task = metrics, task
        self._started = time.monotonic()
        self._sent = False
        self.outcome = ""

    def sent(self) -> None:
        self._sent = True
        self._metrics.sent.labels(task=self._task).inc()

    def __enter__(self) -> TaskTrack:
        self._metrics.awaiting.labels(task=self._task).inc()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        metrics = self._metrics
        metrics.awaiting.labels(task=self._task).dec()
        outcome = self.outcome or (metrics.FAULT if self._sent else metrics.UNREACHABLE)
        if not self.outcome and kind is not None and issubclass(kind, asyncio.CancelledError):
            outcome = metrics.CANCELLED
        metrics.outcomes.labels(task=self._task, outcome=outcome).inc()
        metrics.latency.labels(task=self._task, outcome=outcome).observe(
            time.monotonic() - self._started)


@dataclass
class MetricsHttpServer:
    """A running ``/metrics`` endpoint; `port` is the real bound port."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_http(
    registry: prometheus_client.CollectorRegistry, host: str, port: int
) -> MetricsHttpServer:
    """Serve `registry` on http://host:port/metrics (port 0 picks a free one)."""
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return MetricsHttpServer(int(server.server_port), server, thread)
