"""The nubis-compute process: flavors, key pairs, instances and their actions."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import compute_service_pb2_grpc

from services.client import peers
from services.common import auth, catalog, server, supervise
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.compute import build as boot
from services.compute import (
    flavor,
    hotplug,
    lifecycle,
    migration,
    operation,
    policy,
    power_sync,
    rebuild,
    resize,
    servicer,
    teardown,
)


def register(runner: operation.Runner) -> None:
    """Give the runner a handler for every kind of operation built so far."""
    boot.register(runner)
    teardown.register(runner)
    lifecycle.register(runner)
    resize.register(runner)
    migration.register(runner)
    hotplug.register(runner)
    rebuild.register(runner)


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Wire compute: verifier, task sender, service clients, operation runner, servicer."""
    if settings.compute.default_flavors:
        # Once per cloud: a marker written with the set keeps deleted defaults deleted.
        await flavor.seed_defaults(store)
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    clients = peers.ServiceClients(peers.ClientSettings.from_settings(settings))
    # Operations this replica runs, and orphans of dead replicas it adopts.
    runner = operation.Runner(store, sender, clients, settings.compute)
    register(runner)
    handler = servicer.ComputeServicer(store, settings, sender, clients, runner)
    # Each node's domains asked of its agent, their power state written into the instances.
    sync = power_sync.PowerSync(store, sender, clients, settings.compute.power_sync_interval)

    async def expose_metrics(running: server.RunningServer) -> None:
        sync.metrics.register(running.registry)
        sender.metrics.register(running.registry)

    async def close_clients() -> None:
        await runner.stop()
        await clients.close()
        await sender.close()

    return server.ServiceParts(
        registrations=[server.Registration(
            policy.SERVICE, handler, compute_service_pb2_grpc.add_ComputeServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, policy.TABLE),
        background=[
            *verifier.tasks,  # started above; a failed watch ends the service
            catalog.keep_server_registered(store, "compute", policy.SERVICE,
                                           ttl=settings.catalog_ttl),
            # Logged in and connected before the first requests.
            clients.warm("scheduler", "network", "storage"),
            supervise.start("compute-operations", runner.run_forever),
            supervise.start("compute-power-sync", sync.run_forever),
            expose_metrics,
        ],
        on_stop=[close_clients, stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("compute", build, settings, settings.compute))


if __name__ == "__main__":
    main()
