"""Tasks about the node itself: liveness probe and what libvirt reports."""

from __future__ import annotations

from typing import Any

from celery import Celery

from services.agent import driver as driver_module

PING = "nubis.agent.ping"
NODE_INFO = "nubis.agent.node_info"


def register(app: Celery, driver: driver_module.Driver, node_name: str) -> None:
    """Add the node tasks to `app`, bound to this node's driver."""

    @app.task(name=PING, time_limit=10, soft_time_limit=5)  # type: ignore[untyped-decorator]
    def ping() -> dict[str, str]:
        """Proves a worker consumes this node's queue."""
        return {"node": node_name, "status": "pong"}

    @app.task(name=NODE_INFO, time_limit=30, soft_time_limit=20)  # type: ignore[untyped-decorator]
    def node_info() -> dict[str, Any]:
        facts = driver.facts()
        return {
            "node": node_name,
            "vcpus": facts.vcpus,
            "memory_mb": facts.memory_mb,
            "disk_gb": facts.disk_gb,
            "hypervisor_type": facts.hypervisor_type,
            "domains": driver.domain_names(),
        }
