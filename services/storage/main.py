"""The nubis-storage process: images, storage pools, volumes, snapshots and attachments."""

from __future__ import annotations

import asyncio

from nubis.storage.v1 import storage_service_pb2, storage_service_pb2_grpc

from services.common import auth, catalog, policy, server
from services.common.settings import Settings, load_settings
from services.common.store import Store

SERVICE = "nubis.storage.v1.StorageService"


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the storage API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    methods = storage_service_pb2.DESCRIPTOR.services_by_name["StorageService"].methods
    # Any valid token may call until the servicer brings the real policy table.
    table = {f"/{SERVICE}/{method.name}": policy.authenticated() for method in methods}
    address = f"{settings.storage.host}:{settings.storage.port}"
    # The generated base answers UNIMPLEMENTED to every RPC; its stubs declare them abstract.
    handler = storage_service_pb2_grpc.StorageServiceServicer()  # type: ignore[abstract]
    return server.ServiceParts(
        registrations=[server.Registration(
            SERVICE, handler, storage_service_pb2_grpc.add_StorageServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, table),
        background=[catalog.keep_registered(store, "storage", SERVICE, address)],
        on_stop=[stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("storage", build, settings, settings.storage))


if __name__ == "__main__":
    main()
