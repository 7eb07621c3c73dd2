"""Agent tasks, one module per area (node, storage, network, compute), each run by `phases`."""

from __future__ import annotations

from celery import Celery

from services.agent import dataplane as dataplane_module
from services.agent import driver as driver_module
from services.agent.dataplane import recording
from services.agent.tasks import compute, firewall, network, node, phases, routing, storage
from services.common.settings import Settings


def register_all(app: Celery, driver: driver_module.Driver, node_name: str,
                 dataplane: dataplane_module.Dataplane | None = None,
                 settings: Settings | None = None) -> storage.NodeStorage:
    """Add every task of the contract to `app`, bound to this node's driver, dataplane and
    settings (the image cache and service credential of the storage and compute tasks, the
    compute tasks' console logs); the node's storage (its image cache) that they share.

    Without a dataplane the network tasks only record what they would do.
    """
    locks = phases.Locks()
    for task in node.all_tasks(driver):
        phases.register(app, task, node_name, locks)
    settings = settings if settings is not None else Settings()
    # One image cache for the node: a spawn's kernel fetch and a volume's share its locks.
    node_storage = storage.NodeStorage(driver, settings, node_name)
    for task in [*storage.all_tasks(driver, settings, node_name, node_storage),
                 *compute.all_tasks(driver, settings, node_name, node_storage)]:
        phases.register(app, task, node_name, locks)
    chosen = dataplane or recording.RecordingDataplane("127.0.0.1")
    for task in [*network.all_tasks(driver, chosen), *routing.all_tasks(chosen.routers),
                 *firewall.all_tasks(firewall.choose(settings.agent.port_filter, driver,
                                                     chosen))]:
        phases.register(app, task, node_name, locks)
    return node_storage
