"""Prometheus metrics of one gRPC server: per-RPC count by method and code, latency, in flight.

Each server owns its own CollectorRegistry (never the process-global one), so
several servers in one process (tests, an all-in-one lab) keep separate counts.
`serve_http` exposes a registry on ``/metrics`` of a port of its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
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
