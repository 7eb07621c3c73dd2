"""The nubis-network process: networks, subnets, ports, routers, floating IPs, security groups."""

from __future__ import annotations

import asyncio

from nubis.network.v1 import network_service_pb2, network_service_pb2_grpc

from services.common import auth, catalog, policy, server
from services.common.settings import Settings, load_settings
from services.common.store import Store

SERVICE = "nubis.network.v1.NetworkService"


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the network API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    methods = network_service_pb2.DESCRIPTOR.services_by_name["NetworkService"].methods
    # Any valid token may call until the servicer brings the real policy table.
    table = {f"/{SERVICE}/{method.name}": policy.authenticated() for method in methods}
    address = f"{settings.network.host}:{settings.network.port}"
    # The generated base answers UNIMPLEMENTED to every RPC; its stubs declare them abstract.
    handler = network_service_pb2_grpc.NetworkServiceServicer()  # type: ignore[abstract]
    return server.ServiceParts(
        registrations=[server.Registration(
            SERVICE, handler, network_service_pb2_grpc.add_NetworkServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, table),
        background=[catalog.keep_registered(store, "network", SERVICE, address)],
        on_stop=[stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("network", build, settings, settings.network))


if __name__ == "__main__":
    main()
