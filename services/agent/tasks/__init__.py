"""Agent tasks, one module per area (node, storage, network, compute), each run by `phases`."""

from __future__ import annotations

from celery import Celery

from services.agent import driver as driver_module
from services.agent.tasks import compute, network, node, phases, storage


def register_all(app: Celery, driver: driver_module.Driver, node_name: str) -> None:
    """Add every task of the contract to `app`, bound to this node's driver."""
    locks = phases.Locks()
    for area in (node, storage, network, compute):
        for task in area.all_tasks(driver):
            phases.register(app, task, node_name, locks)
