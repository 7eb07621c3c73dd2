"""Running scheduler replicas for tests: real servers on port 0 over the session etcd."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.common import server
from services.common.settings import EtcdSettings, SchedulerSettings, ServiceEndpoint, Settings
from services.common.store import Lease, Store, Txn
from services.scheduler import cache as cache_module
from services.scheduler import keys, main, nodes, placement, policy, servicer


def settings_for(endpoint: str, prefix: str, **scheduling: object) -> Settings:
    return Settings(
        etcd=EtcdSettings(endpoints=[endpoint], prefix=prefix),
        scheduling=SchedulerSettings.model_validate(scheduling),
    )


@dataclass
class Replica:
    """One scheduler process's worth of parts, in this process."""

    store: Store
    cache: cache_module.NodeCache
    running: server.RunningServer
    channel: grpc.aio.Channel
    stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        await self.channel.close()
        await self.running.stop(0)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()


async def start_replica(settings: Settings, *, seed: int | None = None) -> Replica:
    """A scheduler replica without authentication, with its own etcd connection."""
    store = await Store.connect(settings.etcd.endpoints, root=settings.etcd.prefix)
    node_cache, informer = await main.start_cache(store, settings)
    registrar = asyncio.create_task(nodes.register_nodes(store, node_cache))
    return await serve(store, node_cache, settings, seed=seed, tasks=[informer, registrar])


Start = Callable[..., Awaitable["Replica"]]


@contextlib.asynccontextmanager
async def replica_starter(endpoint: str, prefix: str) -> AsyncIterator[Start]:
    """Start replicas with per-call scheduling settings; all are stopped on exit."""
    replicas: list[Replica] = []

    async def _start(**scheduling: object) -> Replica:
        replica = await start_replica(settings_for(endpoint, prefix, **scheduling))
        replicas.append(replica)
        return replica

    try:
        yield _start
    finally:
        for replica in replicas:
            await replica.stop()


async def frozen_cache(settings: Settings) -> tuple[Store, cache_module.NodeCache]:
    """A node cache that listed once and hears nothing after (its informer stopped).

    Nothing is written between the listing and the stop in the tests that use
    it, so the cache holds exactly what the listing saw: later changes stay unseen.
    """
    store = await Store.connect(settings.etcd.endpoints, root=settings.etcd.prefix)
    node_cache = cache_module.NodeCache(store, settings.scheduling)
    informer = asyncio.create_task(node_cache.run())
    await asyncio.wait_for(node_cache.synced.wait(), 10)
    informer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await informer
    return store, node_cache


async def serve(
    store: Store, node_cache: cache_module.NodeCache, settings: Settings, *,
    seed: int | None = None, tasks: list[asyncio.Task[None]] | None = None,
) -> Replica:
    """Serve the scheduler API over `node_cache` on port 0, without authentication."""
    places = placement.Placement(store, node_cache, settings.scheduling, random.Random(seed))
    handler = servicer.SchedulerServicer(store, node_cache, places, settings.scheduling)
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0),
        [server.Registration(policy.SERVICE, handler,
                             scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server)],
        settings=settings,
    )
    channel = make_channel(running.address, policy=CallPolicy(max_attempts=1))
    return Replica(store, node_cache, running, channel,
                   scheduler_pb2_grpc.SchedulerServiceStub(channel), tasks or [])


def report(
    name: str, *, vcpus: int = 8, memory_mb: int = 16384, disk_gb: int = 100,
    traits: tuple[str, ...] = (), zone: str = "nova", hypervisor: str = "QEMU",
) -> scheduler_pb2.NodeReport:
    return scheduler_pb2.NodeReport(
        name=name,
        capacity=scheduler_pb2.Resources(vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb),
        traits=traits, availability_zone=zone, hypervisor_type=hypervisor,
        queue=f"node.{name}", version="test",
    )


async def put_node(
    store: Store, node: scheduler_pb2.NodeReport, lease: Lease | None = None
) -> None:
    """Write a node report the way an agent does (no agent process)."""
    async def body(txn: Txn) -> None:
        txn.put(keys.node_report(node.name), node, lease=lease)

    await store.atomic(body)


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an async predicate until it holds (TimeoutError after `within` seconds)."""
    async with asyncio.timeout(within):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)
