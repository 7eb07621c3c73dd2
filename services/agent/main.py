"""`nubis-agent --node-name N`: this node's Celery worker plus its liveness heartbeat."""

from __future__ import annotations

import argparse
import os
import signal
import socket

import structlog

from services.agent import app as app_module
from services.agent import dataplane as dataplane_module
from services.agent import driver as driver_module
from services.agent import heartbeat
from services.agent import metrics as agent_metrics
from services.agent import tasks as agent_tasks
from services.common import errors
from services.common import metrics as common_metrics
from services.common.logging import configure_logging
from services.common.settings import Settings, load_settings

log = structlog.get_logger("nubis.agent")


def _first_facts(driver: driver_module.Driver) -> driver_module.HostFacts:
    try:
        return driver.facts()
    except errors.NubisError as exc:
        log.error("cannot read the node from libvirt; not starting", error=exc.message)
        raise SystemExit(1) from exc


def _ensure_pool(driver: driver_module.Driver) -> None:
    """The node's own storage pool defined, built and running before the node is published."""
    try:
        if driver.storage.ensure_node_pool():
            log.info("storage pool ensured", pool=driver.storage.node_pool_name())
    except errors.NubisError as exc:
        log.error("cannot ensure the node's storage pool; not starting", error=exc.message)
        raise SystemExit(1) from exc


def _serve_metrics(settings: Settings) -> common_metrics.MetricsHttpServer | None:
    """The agent's /metrics endpoint (None when metrics_port is 0); a taken port stops the start."""
    agent = settings.agent
    try:
        return agent_metrics.serve(agent.metrics_port, agent.metrics_host)
    except OSError as exc:
        log.error("cannot serve /metrics; not starting", port=agent.metrics_port, error=str(exc))
        raise SystemExit(1) from exc


def run(settings: Settings, node_name: str) -> None:
    """Publish the node, consume `node.<name>` until SIGTERM, then withdraw the node."""
    agent = settings.agent
    driver = driver_module.Driver(
        agent.libvirt_uri,
        storage_pool=agent.storage_pool,
        storage_pool_path=agent.storage_pool_path,
    )
    _ensure_pool(driver)
    report = heartbeat.build_report(_first_facts(driver), settings, node_name)
    app = app_module.make_app(settings, node_name)
    node_storage = agent_tasks.register_all(app, driver, node_name,
                                            dataplane_module.choose(agent, node_name), settings)
    metrics_server = _serve_metrics(settings)
    beat = heartbeat.Heartbeat(settings, report, driver.facts)
    beat.start()
    # Settle before consuming: an agent whose node name is taken must not eat
    # the other agent's queue. Enough time to wait out a crashed predecessor.
    beat.wait_settled(agent.lease_ttl * 2 + 5)
    if beat.ended():
        beat.stop()
        driver.close()
        raise SystemExit(1)
    # Losing the name later (a takeover while partitioned) or a heartbeat bug
    # stops the worker too.
    beat.on_ended = lambda: os.kill(os.getpid(), signal.SIGTERM)
    node_storage.downloader.warm()  # logged in before the node's first image download
    # The worker itself, not `celery worker` parsed from an argv: Celery's command line
    # (click and its plugins) would cost every agent some 8 MiB of memory for nothing.
    worker = app.Worker(
        queues=[report.queue], hostname=f"{report.queue}@{socket.gethostname()}",
        # Threads share the one libvirt connection; prefork would need one per child.
        pool_cls="threads", concurrency=agent.concurrency,
        without_gossip=True, without_mingle=True, loglevel=settings.log_level.upper())
    try:
        worker.start()
    finally:
        beat.stop()
        driver.close()
        if metrics_server is not None:
            metrics_server.stop()
        if beat.ended():  # the worker's own exit status would say all went well
            raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nubis-agent", description=__doc__)
    parser.add_argument("--node-name", default="", help="node name (default: host name)")
    parser.add_argument("--config", default=None, help="TOML settings file")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    node_name = args.node_name or settings.agent.node_name or socket.gethostname()
    configure_logging(settings)
    run(settings, node_name)


if __name__ == "__main__":
    main()
