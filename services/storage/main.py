"""The nubis-storage process: images, pools, volumes, snapshots and attachments."""

from __future__ import annotations

import asyncio

from nubis.storage.v1 import storage_service_pb2, storage_service_pb2_grpc

from services.common import server, unimplemented
from services.common.settings import Settings, load_settings
from services.common.store import Store


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the storage API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    return await unimplemented.service_parts(
        store,
        settings,
        name="storage",
        service=storage_service_pb2.DESCRIPTOR.services_by_name["StorageService"],
        # The generated base answers UNIMPLEMENTED; its stubs declare the methods abstract.
        servicer=storage_service_pb2_grpc.StorageServiceServicer(),  # type: ignore[abstract]
        add_to_server=storage_service_pb2_grpc.add_StorageServiceServicer_to_server,
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("storage", build, settings, settings.storage))


if __name__ == "__main__":
    main()
