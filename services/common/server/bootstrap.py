"""Start, run and drain a nubis gRPC server: the body of every service's main.

`start` binds a grpc.aio server with the interceptor, health, reflection,
optional TLS and a Prometheus ``/metrics`` port. `run_service` is the whole
life of a service process: logging, store, build, serve until SIGTERM or
SIGINT, drain, stop background work, close the store. While it serves, health
follows etcd: NOT_SERVING while the store does not answer, SERVING once it does.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import prometheus_client
import structlog
from grpc_reflection.v1alpha import reflection

from services.common import errors, metrics, supervise
from services.common import logging as nubis_logging
from services.common.server import health as server_health
from services.common.server.interceptors import Authenticator, Drain, ServerInterceptor
from services.common.settings import ServiceEndpoint, Settings, TlsSettings, host_port

if TYPE_CHECKING:
    from services.common.store import Store

_log = structlog.get_logger("nubis.server")

# Clients ping every 30 s (see services.client.channel); accept pings down to
# every 10 s, also on idle connections, instead of answering GOAWAY.
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
)

# Time left to in-flight calls once the drain wait is over and grpc stops.
_FINAL_STOP_GRACE = 1.0


@dataclass(frozen=True)
class Registration:
    """One gRPC service to serve: its full name, servicer and generated add function."""

    service_name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.aio.Server], None]


Job = Coroutine[Any, Any, None]
# A background job that needs the started server, e.g. its bound address when
# the configured port is 0: called with the RunningServer once it serves.
JobFactory = Callable[["RunningServer"], Job]


@dataclass
class ServiceParts:
    """What a service's `build` returns to `run_service`."""

    registrations: list[Registration]
    authenticator: Authenticator | None = None
    public_methods: frozenset[str] = frozenset()
    background: Sequence[Job | JobFactory | asyncio.Task[None]] = field(default_factory=list)
    """Run as tasks beside the server (watches, loops); cancelled on stop.

    A coroutine runs as it is; a callable is first called with the RunningServer;
    a task already started by `build` (an informer that had to sync before the
    server could answer) is watched as it is. A task that fails ends the
    service, so loops that must survive errors run under services.common.supervise.
    """
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Awaited in order after the server stopped and the background tasks ended."""
    server_options: Sequence[tuple[str, Any]] = ()
    """grpc server arguments of this service, beside SERVER_OPTIONS (e.g. a stream window)."""


class RunningServer:
    """A started server; `stop` drains it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        host: str,
        health: server_health.Health,
        drain: Drain,
        metrics_http: metrics.MetricsHttpServer | None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.port = port
        # The server's own metrics registry: a service may add its collectors.
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        # What clients dial and the catalog publishes: never a wildcard bind address.
        self.address = host_port(host, port)
        self.metrics_port = metrics_http.port if metrics_http else None
        self._server = server
        self._health = health
        self._drain = drain
        self._metrics_http = metrics_http
        self._stopping: asyncio.Task[None] | None = None

    async def stop(self, grace: float) -> None:
        """Drain: NOT_SERVING, refuse new calls, wait up to `grace` for in-flight ones, stop.

        Calling it again (a second signal) waits for the same drain.
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        await self._health.draining()
        self._drain.draining = True
        idle = await self._drain.wait_idle(grace)
        if not idle:
            _log.warning("grace expired; cancelling calls", in_flight=self._drain.in_flight)
        await self._server.stop(_FINAL_STOP_GRACE if idle else 0)
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.stop)

    async def wait_closed(self) -> None:
        await self._server.wait_for_termination()

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING (a draining server stays NOT_SERVING)."""
        await self._health.set_serving(serving)


class _GenericOnly:
    """The server as a service's generated add function sees it: its methods are served
    through their generic handler only.

    grpc's asyncio server keeps one pending request per registered method and, for
    every call it takes, waits on all of them again: a service of forty methods paid
    for forty on each call. The generic handler serves the same methods.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
                                       ) -> None:
        """Left to the generic handler the generated code adds as well."""


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise ValueError(f"TLS is enabled but tls.{what} is not set")
    return Path(path).read_bytes()


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """Server TLS credentials; with require_client_cert, clients must present a cert of ca_file."""
    pair = (_read(tls.key_file, "key_file"), _read(tls.cert_file, "cert_file"))
    ca = _read(tls.ca_file, "ca_file") if tls.require_client_cert or tls.ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=tls.require_client_cert
    )


async def start(
    endpoint: ServiceEndpoint,
    registrations: Iterable[Registration],
    *,
    settings: Settings,
    authenticator: Authenticator | None = None,
    public_methods: frozenset[str] = frozenset(),
    options: Sequence[tuple[str, Any]] = (),
) -> RunningServer:
    """Start serving `registrations` on `endpoint` (port 0 binds a free port), with grpc
    server arguments `options` beside SERVER_OPTIONS."""
    registrations = list(registrations)
    # Read the certificates first: a TLS misconfiguration fails before anything starts.
    credentials = server_credentials(settings.tls) if settings.tls.enabled else None
    rpc_metrics = metrics.RpcMetrics()
    drain = Drain()
    interceptor = ServerInterceptor(
        authenticator=authenticator,
        public_methods=public_methods,
        metrics=rpc_metrics,
        drain=drain,
    )
    server = grpc.aio.server(interceptors=[interceptor], options=[*SERVER_OPTIONS, *options])
    generic_only = cast(grpc.aio.Server, _GenericOnly(server))
    for registration in registrations:
        registration.add_to_server(registration.servicer, generic_only)
    health = server_health.Health(server)
    names = [r.service_name for r in registrations]
    reflection.enable_server_reflection(
        [*names, server_health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bind = host_port(endpoint.host, endpoint.port)
    if credentials is not None:
        port = server.add_secure_port(bind, credentials)
    else:
        port = server.add_insecure_port(bind)
    await server.start()
    metrics_http = None
    if endpoint.metrics_port is not None:
        metrics_http = metrics.serve_http(
            rpc_metrics.registry, endpoint.host, endpoint.metrics_port
        )
    await health.serving(names)
    return RunningServer(server, port, endpoint.advertised_host(), health, drain, metrics_http,
                         rpc_metrics.registry)


def start_background(parts: ServiceParts, running: RunningServer) -> list[asyncio.Task[None]]:
    """Start `parts.background` beside `running` (factories get the running server)."""
    return [_background_task(job, running) for job in parts.background]


def _background_task(job: Job | JobFactory | asyncio.Task[None],
                     running: RunningServer) -> asyncio.Task[None]:
    if isinstance(job, asyncio.Task):
        return job
    return asyncio.create_task(job if asyncio.iscoroutine(job) else job(running))


async def follow_store_health(store: Store, running: RunningServer, interval: float) -> None:
    """Report NOT_SERVING while etcd does not answer `store`, and SERVING again once it does.

    Without etcd a service can answer nothing but errors; telling load balancers
    and probes so is what an operator expects, and nothing else is done about
    it: the informers, watches and leases recover on their own.
    """
    serving = True
    while True:
        try:
            await store.revision()
            reachable = True
        except errors.Unavailable as exc:
            reachable, error = False, str(exc)
        if reachable != serving:
            serving = reachable
            await running.set_serving(serving)
            if serving:
                _log.info("etcd reachable again; serving", endpoint=store.endpoint)
            else:
                _log.warning("etcd unreachable; not serving", error=error)
        await asyncio.sleep(interval)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


class _Lifetime:
    """Ends the serving phase: on a signal, or when a background task fails."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop = asyncio.Event()
        self.failed = False

    def watch(self, task: asyncio.Task[None]) -> None:
        task.add_done_callback(self._on_done)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return  # a background job may simply be finished
        # A dead background loop (a watch, a reconciler) leaves the service
        # half-working: stop, and let the supervisor restart the process.
        _log.error("background task failed", service=self.name, exc_info=task.exception())
        self.failed = True
        self.stop.set()


async def _serve_until_stopped(
    name: str, running: RunningServer, parts: ServiceParts, settings: Settings, store: Store
) -> int:
    """Serve until a signal or a failed background task; return the exit status."""
    lifetime = _Lifetime(name)
    _install_signal_handlers(lifetime.stop)
    tasks = start_background(parts, running)
    tasks.append(supervise.start(
        "store-health", lambda: follow_store_health(store, running, settings.etcd.health_interval)
    ))
    for task in tasks:
        lifetime.watch(task)
    _log.info("serving", service=name, address=running.address, metrics_port=running.metrics_port)
    await lifetime.stop.wait()
    _log.info("draining", service=name, grace=settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _run_on_stop(parts)
    return 1 if lifetime.failed else 0


async def _run_on_stop(parts: ServiceParts) -> None:
    for callback in parts.on_stop:
        await callback()


# What a start fails with when the host, not the code, is at fault: a port in
# use (grpc raises RuntimeError), an address or certificate file that won't do.
_START_FAILURES = (RuntimeError, OSError, errors.NubisError)


async def _start_and_serve(
    name: str, parts: ServiceParts, settings: Settings, endpoint: ServiceEndpoint, store: Store
) -> int:
    """Start, serve until stopped, and return the exit status; on_stop runs in every case."""
    try:
        running = await start(
            endpoint,
            parts.registrations,
            settings=settings,
            authenticator=parts.authenticator,
            public_methods=parts.public_methods,
            options=parts.server_options,
        )
    except _START_FAILURES as exc:
        # One line an operator can act on; a traceback would only bury the cause.
        _log.error("cannot start", service=name, address=f"{endpoint.host}:{endpoint.port}",
                   error=str(exc))
        await _run_on_stop(parts)
        return 1
    except BaseException:
        await _run_on_stop(parts)
        raise
    return await _serve_until_stopped(name, running, parts, settings, store)


async def run_service(
    name: str,
    build: Callable[[Store, Settings], Awaitable[ServiceParts]],
    settings: Settings,
    endpoint: ServiceEndpoint,
) -> None:
    """The whole life of a service process; raises SystemExit(1) if it stopped on a failure."""
    from services.common.store import Store  # imported here: only services need etcd

    nubis_logging.configure_logging(settings)
    store = await Store.connect(
        settings.etcd.endpoints, root=settings.etcd.prefix, timeout=settings.etcd.timeout
    )
    try:
        parts = await build(store, settings)
        exit_status = await _start_and_serve(name, parts, settings, endpoint, store)
    finally:
        await store.close()
    _log.info("stopped", service=name)
    if exit_status:
        raise SystemExit(exit_status)
