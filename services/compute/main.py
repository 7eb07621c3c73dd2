"""The nubis-compute process: flavors, key pairs, instances and their actions."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import compute_service_pb2, compute_service_pb2_grpc

from services.common import server, unimplemented
from services.common.settings import Settings, load_settings
from services.common.store import Store


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the compute API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    return await unimplemented.service_parts(
        store,
        settings,
        name="compute",
        service=compute_service_pb2.DESCRIPTOR.services_by_name["ComputeService"],
        # The generated base answers UNIMPLEMENTED; its stubs declare the methods abstract.
        servicer=compute_service_pb2_grpc.ComputeServiceServicer(),  # type: ignore[abstract]
        add_to_server=compute_service_pb2_grpc.add_ComputeServiceServicer_to_server,
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("compute", build, settings, settings.compute))


if __name__ == "__main__":
    main()
