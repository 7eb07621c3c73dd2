"""A small cloud for the network tests: identity, the scheduler and network in-process.

Identity (with the projects and callers of the authorization world), a
scheduler and a network service are real servers over the session etcd and
Redis, each built by its own `main.build` (token checks, catalog entries).
Network calls the scheduler with the service credential, as in production.
Agents are real `nubis-agent` subprocesses on libvirt's test driver, started
by the tests that need nodes (`NetCloud.start_agent`). More network
replicas (`NetCloud.add_replica`) race the first one in the IPAM tests.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import message
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import network_pb2, network_service_pb2_grpc, port_pb2, subnet_pb2
from nubis.scheduler.v1 import scheduler_pb2
from pydantic import SecretStr

from services.client.channel import make_channel
from services.common import quota, tasks
from services.common.settings import (
    NetworkSettings,
    ServiceAuthSettings,
    ServiceEndpoint,
    Settings,
)
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
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
T = TypeVar("T")


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
    sender: TaskSender | None = None
    extra: list[Service] = field(default_factory=list)
    extra_channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.world.store

    @property
    def replicas(self) -> list[Service]:
        """Every network replica: the first one, then those `add_replica` started."""
        return [self.network, *self.extra]

    async def add_replica(self, **networking: Any) -> int:
        """Start one more network replica (as its main builds it); returns its index."""
        settings = network_settings(self.world.settings, self.world.identity, **networking)
        service = await start_service(network_main.build, self.store, settings,
                                      settings.network)
        self.extra.append(service)
        self.extra_channels.append(make_channel(service.running.address))
        return len(self.extra)

    async def stop_replica(self, index: int) -> None:
        """Stop a replica `add_replica` started."""
        await self.extra_channels[index - 1].close()
        await self.extra[index - 1].stop()

    def stub(self, replica: int = 0) -> network_service_pb2_grpc.NetworkServiceAsyncStub:
        channel = self.channel if replica == 0 else self.extra_channels[replica - 1]
        return network_service_pb2_grpc.NetworkServiceStub(channel)

    async def call(self, method: str, request: message.Message, caller: str = "a_member",
                   replica: int = 0) -> Any:
        """Call `method` on replica `replica` with `caller`'s token."""
        rpc = getattr(self.stub(replica), method)
        return await rpc(request, metadata=self.world.metadata(caller))

    async def make_network(self, caller: str = "a_member", **fields: Any) -> network_pb2.Network:
        given = network_pb2.Network(
            meta=resource_pb2.ResourceMeta(name=f"net-{uuid.uuid4().hex[:8]}"), **fields)
        reply: network_pb2.Network = await self.call(
            "CreateNetwork", network_pb2.CreateNetworkRequest(network=given), caller)
        return reply

    async def make_subnet(self, network_id: str, cidr: str, caller: str = "a_member",
                          **fields: Any) -> subnet_pb2.Subnet:
        given = subnet_pb2.Subnet(network_id=network_id, cidr=cidr, **fields)
        reply: subnet_pb2.Subnet = await self.call(
            "CreateSubnet", subnet_pb2.CreateSubnetRequest(subnet=given), caller)
        return reply

    async def make_port(self, network_id: str, caller: str = "a_member", replica: int = 0,
                        **fields: Any) -> port_pb2.Port:
        given = port_pb2.Port(network_id=network_id, **fields)
        reply: port_pb2.Port = await self.call(
            "CreatePort", port_pb2.CreatePortRequest(port=given), caller, replica)
        return reply

    async def unlimited(self, project_id: str) -> None:
        """No network, subnet or port quota for `project_id` (tests that make many)."""
        limits = {name: quota.UNLIMITED for name in ("networks", "subnets", "ports")}
        await self.store.create(quota.quota_key(project_id),
                                identity_pb2.Quota(project_id=project_id, limits=limits))

    def api(self, caller: str = "a_member") -> Api:
        """The network API with `caller`'s token (callers as in the authorization world)."""
        stub = network_service_pb2_grpc.NetworkServiceStub(self.channel)
        return Api(stub, self.world.metadata(caller))

    async def ask(self, node: str, spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
                  request: tasks.Req) -> tasks.Resp:
        """Run an agent task on `node` (e.g. read back what its dataplane holds)."""
        if self.sender is None:
            self.sender = await TaskSender.connect(SenderConfig.from_settings(
                self.world.settings))
        return await self.sender.send(node, spec, request,
                                      operation_id=tasks.new_operation_id())

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


def network_settings(base: Settings, identity: Service, **networking: Any) -> Settings:
    """What a network process is configured with: identity's real address, the credential.

    The realizer retries pending realizations twice a second (the default is
    every 2 s) and gives an agent 10 s; `networking` overrides either.
    """
    host, _, port = identity.running.address.rpartition(":")
    chosen = NetworkSettings.model_validate(
        {"realize_interval": 0.5, "realize_timeout": 10.0, **networking})
    return base.model_copy(update={
        "identity": ServiceEndpoint(host=host, port=int(port)),
        "network": ServiceEndpoint(host="127.0.0.1", port=0),
        "networking": chosen,
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
    made = NetCloud(world, network, scheduler, agents, channel)
    for project_id in (world.project_a, world.project_b):
        await made.unlimited(project_id)
    return made


async def stop_cloud(cloud: NetCloud) -> None:
    if cloud.sender is not None:
        await cloud.sender.close()
    cloud.agents.stop_all()
    for channel in cloud.extra_channels:
        await channel.close()
    for service in cloud.extra:
        await service.stop()
    store = cloud.world.store
    await stop_world(cloud.world)
    await store.close()


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = 20.0,
                     interval: float = 0.1) -> T:
    """The first truthy result of `check`, polled until `within` seconds pass."""
    loop = asyncio.get_running_loop()
    ends = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        if loop.time() >= ends:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def code_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code()
