"""Prometheus metrics of one agent's tasks: count by task and outcome, latency, in flight.

Every task runs through `phases.run`, which records here. The outcome is
"ok" (a response), "error" (a domain error of the contract; `error` names
its class, e.g. NotFound) or "fault" (anything else: a bug, a time limit).
The metrics live in a registry of their own, served on the agent's
``metrics_port`` by `serve`.
"""

from __future__ import annotations

import prometheus_client

from services.common import metrics as common_metrics

# Buckets in seconds: a ping takes milliseconds, a spawn or an image fetch minutes.
TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0)

OK = "ok"
ERROR = "error"
FAULT = "fault"


class TaskMetrics:
    """The task metrics of one agent, in a registry of their own."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.handled = prometheus_client.Counter(
            "nubis_agent_tasks",
            "Tasks finished, by task name, outcome (ok, error, fault) and domain error class.",
            ["task", "outcome", "error"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            "nubis_agent_task_duration_seconds",
            "Time from the start of a task's run to its outcome, by task name and outcome.",
            ["task", "outcome"],
            buckets=TASK_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = prometheus_client.Gauge(
            "nubis_agent_tasks_in_flight",
            "Tasks running right now, by task name.",
            ["task"],
            registry=self.registry,
        )

    def observe(self, task: str, outcome: str, seconds: float, error: str = "") -> None:
        """Record one finished task."""
        self.handled.labels(task=task, outcome=outcome, error=error).inc()
        self.latency.labels(task=task, outcome=outcome).observe(seconds)


TASKS = TaskMetrics()
"""The agent process's task metrics (one agent per process)."""


def serve(port: int, host: str = "") -> common_metrics.MetricsHttpServer | None:
    """Serve `TASKS` on http://host:port/metrics; None if `port` is 0 (metrics off)."""
    if port == 0:
        return None
    return common_metrics.serve_http(TASKS.registry, host, port)
