"""The nubis-network process: networks, subnets, ports, routers, floating IPs, security groups."""

from __future__ import annotations

import asyncio

from nubis.network.v1 import network_service_pb2, network_service_pb2_grpc

from services.common import server, unimplemented
from services.common.settings import Settings, load_settings
from services.common.store import Store


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the network API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    return await unimplemented.service_parts(
        store,
        settings,
        name="network",
        service=network_service_pb2.DESCRIPTOR.services_by_name["NetworkService"],
        # The generated base answers UNIMPLEMENTED; its stubs declare the methods abstract.
        servicer=network_service_pb2_grpc.NetworkServiceServicer(),  # type: ignore[abstract]
        add_to_server=network_service_pb2_grpc.add_NetworkServiceServicer_to_server,
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("network", build, settings, settings.network))


if __name__ == "__main__":
    main()
