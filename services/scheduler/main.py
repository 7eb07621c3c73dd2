"""The nubis-scheduler process: nodes, placement claims and server groups."""

from __future__ import annotations

import asyncio
import gc
import random

from nubis.scheduler.v1 import scheduler_pb2_grpc

from services.common import auth, catalog, server
from services.common.settings import Settings, load_settings
from services.common.store import Store
from services.scheduler import cache as cache_module
from services.scheduler import metrics as metrics_module
from services.scheduler import nodes, placement, policy, ratios, servicer

# How long a starting replica waits for its first full listing of the nodes.
SYNC_TIMEOUT = 30.0


async def start_cache(
    store: Store, settings: Settings
) -> tuple[cache_module.NodeCache, asyncio.Task[None]]:
    """A node cache that has listed everything once, and the task that keeps it current.

    The first replica of a cloud writes its default allocation ratios first
    (from its settings; a later replica's settings change nothing).
    """
    await ratios.ensure_defaults(store, settings.scheduling)
    node_cache = cache_module.NodeCache(store, settings.scheduling)
    task = asyncio.create_task(node_cache.run(), name="node-informer")
    await asyncio.wait_for(node_cache.synced.wait(), SYNC_TIMEOUT)
    # The first listing is most of what the process will ever hold (10,000
    # nodes: ~16 ms per full collection). Moving it out of the collector's
    # reach keeps those pauses out of the claims' tail latency.
    gc.freeze()
    return node_cache, task


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    """Wire the scheduler: informer, token verifier, servicer, policy, catalog entry."""
    node_cache, informer = await start_cache(store, settings)
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    claim_metrics = metrics_module.ClaimMetrics()
    places = placement.Placement(store, node_cache, settings.scheduling, random.Random(),
                                 claim_metrics)
    handler = servicer.SchedulerServicer(store, node_cache, places, settings.scheduling)

    async def expose_metrics(running: server.RunningServer) -> None:
        claim_metrics.register(running.registry)

    async def stop_informer() -> None:
        informer.cancel()
        # An informer that failed has ended the service already and was logged.
        await asyncio.gather(informer, return_exceptions=True)

    return server.ServiceParts(
        registrations=[server.Registration(
            policy.SERVICE, handler, scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server
        )],
        authenticator=auth.TokenAuthenticator(verifier, policy.TABLE),
        background=[
            # The informer and the verifier's watches were started above (they
            # had to sync first); listed here, a failure of one ends the service.
            informer,
            *verifier.tasks,
            expose_metrics,
            nodes.register_nodes(store, node_cache),
            catalog.keep_server_registered(store, "scheduler", policy.SERVICE,
                                           ttl=settings.catalog_ttl),
        ],
        on_stop=[stop_informer, stop_verifier],
    )


def main() -> None:
    settings = load_settings()
    asyncio.run(server.run_service("scheduler", build, settings, settings.scheduler))


if __name__ == "__main__":
    main()
