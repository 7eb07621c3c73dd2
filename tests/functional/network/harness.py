"""A small cloud for the network tests: identity, the scheduler and network in-process.

Identity (with the projects and callers of the authorization world), a
scheduler and a network service are real servers over the session etcd and
Redis, each built by its own `main.build` (token checks, catalog entries).
Network calls the scheduler with the service credential, as in production.
Agents are real `nubis-agent` subprocesses on libvirt's test driver, started
by the tests that need nodes (`NetCloud.start_agent`).
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from nubis.network.v1 import network_service_pb2_grpc
from nubis.scheduler.v1 import scheduler_pb2
from pydantic import SecretStr

from services.client.channel import make_channel
from services.common.settings import ServiceAuthSettings, ServiceEndpoint, Settings
from services.common.store import Store
from services.identity import bootstrap
from services.network import main as network_main
from services.network import policy as network_policy
from services.scheduler import main as scheduler_main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.agent_harness import AgentLauncher
from tests.functional.authz.world import (
    Service,
    World,
    build_world,
    service_settings,
    start_service,
    stop_world,
    write_key,
)

SERVICE = network_policy.SERVICE
SCHEDULER = "nubis.scheduler.v1.SchedulerService"
SERVICE_PASSWORD = "network-tests-service-password"


class Api:
    """NetworkService as one caller: every stub method with that caller's token."""

    def __init__(self, stub: network_service_pb2_grpc.NetworkServiceAsyncStub,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        return functools.partial(getattr(self._stub, name), metadata=self._metadata)


@dataclass
class NetCloud:
    """The world's identity and callers, a scheduler, network, and the agents started so far."""

    world: World
    network: Service
    scheduler: Service
    agents: AgentLauncher
    channel: grpc.aio.Channel
    nodes: list[str] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.world.store

    def api(self, caller: str = "a_member") -> Api:
        """The network API with `caller`'s token (callers as in the authorization world)."""
        stub = network_service_pb2_grpc.NetworkServiceStub(self.channel)
        return Api(stub, self.world.metadata(caller))

    async def start_agent(self, name: str, *, network_node: bool = False) -> None:
        """A node agent on the test driver, flagged a network node or not; waits until it is UP."""
        env = {"NUBIS_AGENT__NETWORK_NODE": "true" if network_node else "false"}
        self.agents.start(name, env)
        self.nodes.append(name)
        await self.wait_node(name)

    async def wait_node(self, name: str, within: float = 30.0) -> scheduler_pb2.Node:
        """The scheduler's view of node `name` once it is UP."""
        ends = time.monotonic() + within
        while True:
            try:
                node = await self.world.call(SCHEDULER, "GetNode",
                                             scheduler_pb2.GetNodeRequest(name=name),
                                             "cloud_admin")
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                assert isinstance(node, scheduler_pb2.Node)
                if node.state == scheduler_pb2.NODE_STATE_UP:
                    return node
            if time.monotonic() > ends:
                raise TimeoutError(f"node {name} did not come up in {within}s")
            await asyncio.sleep(0.2)


def network_settings(base: Settings, identity: Service) -> Settings:
    """What a network process is configured with: identity's real address, the credential."""
    host, _, port = identity.running.address.rpartition(":")
    return base.model_copy(update={
        "identity": ServiceEndpoint(host=host, port=int(port)),
        "network": ServiceEndpoint(host="127.0.0.1", port=0),
    })


async def start_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint, root: str,
                      tmp: Path) -> NetCloud:
    key_file = tmp / "signing.pem"
    key = write_key(key_file)
    settings = service_settings(etcd.endpoint, root, key_file, redis.url)
    settings.service_auth = ServiceAuthSettings(password=SecretStr(SERVICE_PASSWORD))
    store = await Store.connect([etcd.endpoint], root=root)
    world = await build_world(store, settings, key)
    await bootstrap.ensure_service_user(store, settings.auth, settings.service_auth,
                                        SERVICE_PASSWORD)
    scheduler = await start_service(scheduler_main.build, store, settings,
                                    ServiceEndpoint(host="127.0.0.1", port=0))
    world.services[SCHEDULER] = scheduler
    world.channels[SCHEDULER] = make_channel(scheduler.running.address)
    net_settings = network_settings(settings, world.identity)
    network = await start_service(network_main.build, store, net_settings, net_settings.network)
    world.services[SERVICE] = network
    channel = make_channel(network.running.address)
    world.channels[SERVICE] = channel
    agents = AgentLauncher(etcd, redis, root, tmp / "agents")
    return NetCloud(world, network, scheduler, agents, channel)


async def stop_cloud(cloud: NetCloud) -> None:
    cloud.agents.stop_all()
    store = cloud.world.store
    await stop_world(cloud.world)
    await store.close()
