"""The nubis-network process: networks, subnets, IPAM, ports, routers, floating IPs, firewalls."""

from __future__ import annotations

import asyncio

from nubis.network.v1 import network_service_pb2_grpc

from services.client import peers
from services.common import auth, catalog, server, supervise
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.network import policy, router_node, servicer


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Wire network: verifier, task sender, service clients, servicer, policy, catalog entry."""
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    clients = peers.ServiceClients(peers.ClientSettings.from_settings(settings))
    handler = servicer.NetworkServicer(store, settings, sender, clients)

    async def close_clients() -> None:
        await clients.close()
        await sender.close()

    return server.ServiceParts(
        registrations=[server.Registration(
            policy.SERVICE, handler, network_service_pb2_grpc.add_NetworkServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, policy.TABLE),
        background=[
            *verifier.tasks,  # started above; a failed watch ends the service
            catalog.keep_server_registered(store, "network", policy.SERVICE,
                                           ttl=settings.catalog_ttl),
            clients.warm("scheduler"),  # logged in and connected before the first requests
            # Re-realizes bound ports whose node is behind (a bind cut short, an agent away).
            supervise.supervise("network-realizer", handler.realizer.loop),
            # Re-realizes routers left BUILD or ERROR (their node was away).
            supervise.supervise("network-routers",
                                lambda: router_node.reconcile_loop(handler.router_env)),
            sender.metrics.expose,  # the task sender's metrics on this server's /metrics
        ],
        on_stop=[close_clients, stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("network", build, settings, settings.network))


if __name__ == "__main__":
    main()
