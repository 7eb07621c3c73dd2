"""The nubis-compute process: flavors, key pairs, instances and their actions."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import compute_service_pb2, compute_service_pb2_grpc

from services.common import auth, catalog, policy, server
from services.common.settings import Settings, load_settings
from services.common.store import Store

SERVICE = "nubis.compute.v1.ComputeService"


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Serve the compute API: token-checked, every RPC still UNIMPLEMENTED (the generated base)."""
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    methods = compute_service_pb2.DESCRIPTOR.services_by_name["ComputeService"].methods
    # Any valid token may call until the servicer brings the real policy table.
    table = {f"/{SERVICE}/{method.name}": policy.authenticated() for method in methods}
    address = f"{settings.compute.host}:{settings.compute.port}"
    # The generated base answers UNIMPLEMENTED to every RPC; its stubs declare them abstract.
    handler = compute_service_pb2_grpc.ComputeServiceServicer()  # type: ignore[abstract]
    return server.ServiceParts(
        registrations=[server.Registration(
            SERVICE, handler, compute_service_pb2_grpc.add_ComputeServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, table),
        background=[catalog.keep_registered(store, "compute", SERVICE, address)],
        on_stop=[stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("compute", build, settings, settings.compute))


if __name__ == "__main__":
    main()
