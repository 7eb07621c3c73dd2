"""The nubis-storage process: images, pools, volumes, snapshots and attachments."""

from __future__ import annotations

import asyncio

from services.client import peers
from services.common import auth, catalog, server, supervise
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.storage import (
    image_store,
    image_upload,
    operation,
    policy,
    servicer,
    snapshot,
    volume_ops,
)


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Wire storage: verifier, task sender, service clients, servicer, policy, catalog entry."""
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    clients = peers.ServiceClients(peers.ClientSettings.from_settings(settings))
    # Operations this replica runs, and orphans of dead replicas it adopts.
    runner = operation.Runner(store, sender, clients, settings.storage)
    volume_ops.register(runner)
    snapshot.register(runner)
    handler = servicer.StorageServicer(store, settings, sender, clients, runner)

    async def close_clients() -> None:
        await runner.stop()
        await clients.close()
        await sender.close()

    return server.ServiceParts(
        registrations=[server.Registration(
            policy.SERVICE, handler, image_upload.add_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, policy.TABLE),
        background=[
            *verifier.tasks,  # started above; a failed watch ends the service
            catalog.keep_server_registered(store, "storage", policy.SERVICE,
                                           ttl=settings.catalog_ttl),
            clients.warm("scheduler"),  # logged in and connected before the first requests
            # Uploads and deletes of images whose replica died: given back.
            supervise.start("image-recovery",
                            lambda: image_upload.keep_recovering(store, handler.images)),
            supervise.start("storage-operations", runner.run_forever),
            sender.metrics.expose,  # the task sender's metrics on this server's /metrics
        ],
        on_stop=[close_clients, stop_verifier],
        server_options=image_upload.SERVER_OPTIONS,
    )


def main() -> None:
    image_store.reuse_chunk_buffers()  # freed image chunks are reused, never mapped afresh
    settings = load_settings()
    asyncio.run(server.run_service("storage", build, settings, settings.storage))


if __name__ == "__main__":
    main()
