"""A cloud for the power verbs, the power sync and the watch: identity, scheduler, compute, agents.

Identity (with the authorization world's projects and callers), the scheduler
and compute run in-process as their mains build them; two `nubis-agent`
subprocesses run libvirt's test driver. The instances of these tests are
written straight into the store and their domains made by sending `spawn`
to the node (no boot workflow): what is tested is how compute drives and
reads an existing domain. `domain` asks a node's libvirt, never etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import compute_service_pb2_grpc, instance_pb2, instance_requests_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from pydantic import SecretStr

from services.client.channel import CallPolicy, make_channel
from services.common import errors, resources, tasks
from services.common.settings import ServiceAuthSettings, ServiceEndpoint
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.compute import instance as instance_module
from services.compute import keys
from services.compute import main as compute_main
from services.scheduler import main as scheduler_main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness
from tests.functional.authz.world import (
    PASSWORD,
    Service,
    World,
    build_world,
    service_settings,
    start_service,
    stop_world,
    write_key,
)

NODES = ("power-node-1", "power-node-2")
GHOST = "power-node-ghost"
"""A node no agent serves: an operation sent there stays in flight."""
SYNC_INTERVAL = 0.3
Instance = instance_pb2.Instance


@dataclass
class PowerCloud:
    """The running parts, and what a test calls them with."""

    world: World
    scheduler: Service
    compute: Service
    agents: agent_harness.AgentLauncher
    sender: TaskSender
    tmp: Path
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def store(self) -> Store:
        return self.world.store

    def stub(self) -> compute_service_pb2_grpc.ComputeServiceAsyncStub:
        channel = make_channel(self.compute.running.address, policy=CallPolicy(max_attempts=1))
        self.channels.append(channel)
        return compute_service_pb2_grpc.ComputeServiceStub(channel)

    def as_(self, caller: str) -> tuple[tuple[str, str], ...]:
        return self.world.metadata(caller)

    def console_dir(self, node: str) -> Path:
        return self.tmp / node / "console"

    def agent_env(self, node: str) -> dict[str, str]:
        return {**agent_harness.storage_env(self.tmp / node),
                "NUBIS_AGENT__CONSOLE_LOG_DIR": str(self.console_dir(node))}

    def start_agent(self, node: str) -> None:
        self.agents.start(node, self.agent_env(node))

    def stop_agent(self, node: str) -> None:
        """Stop the node's agent (its test-driver domains die with it)."""
        for daemon in self.agents.started:
            if daemon.name == f"agent-{node}":
                daemon.stop()

    async def spawn(self, node: str, instance_id: str, project_id: str = "") -> None:
        """Make and start the domain of `instance_id` on `node` through its agent."""
        spec = tasks_pb2.DomainSpec(
            name=instance_module.domain_name(instance_id), uuid=instance_id, vcpus=1,
            memory_mb=64, project_id=project_id, hostname="guest",
            disks=[tasks_pb2.DomainDisk(path=f"/var/lib/nubis/test/{instance_id}.img",
                                        format="raw", target_dev="vda", boot=True)])
        await self.sender.send(node, tasks.SPAWN, tasks_pb2.SpawnRequest(domain=spec),
                               operation_id=tasks.new_operation_id())

    async def domain(self, node: str, instance_id: str) -> tasks_pb2.DomainStatus | None:
        """The instance's domain as the node's libvirt reports it (None: it has none)."""
        try:
            return await self.sender.send(
                node, tasks.DOMAIN_STATUS,
                tasks_pb2.DomainStatusRequest(name=instance_module.domain_name(instance_id)),
                operation_id=tasks.new_operation_id())
        except errors.NotFound:
            return None

    async def instance(self, node: str, *, project_id: str = "", state: int = Instance.ACTIVE,
                       spawn: bool = True) -> Instance:
        """An idle instance of `project_id` (project A) on `node`; its domain runs if `spawn`."""
        meta = resources.fresh_meta(
            resource_pb2.ResourceMeta(name=f"vm-{uuid.uuid4().hex[:6]}"),
            project_id or self.world.project_a)
        if spawn:
            await self.spawn(node, meta.id, meta.project_id)
        made = Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                        node=node, domain_name=instance_module.domain_name(meta.id),
                        power_state=Instance.POWER_STATE_RUNNING if spawn
                        else Instance.POWER_STATE_NOSTATE)
        made.state = state  # type: ignore[assignment]
        if state == Instance.STOPPED and spawn:
            await self.sender.send(node, tasks.POWER_OFF, tasks_pb2.PowerOffRequest(
                name=made.domain_name), operation_id=tasks.new_operation_id())
            made.power_state = Instance.POWER_STATE_SHUTDOWN
        await self.store.create(keys.instance(meta.id), made)
        return made

    async def get(self, instance_id: str, caller: str = "cloud_admin") -> Instance:
        found: Instance = await self.stub().GetInstance(
            instance_requests_pb2.GetInstanceRequest(id=instance_id), metadata=self.as_(caller))
        return found

    async def settled(self, instance_id: str, within: float = 20.0,
                      caller: str = "cloud_admin") -> Instance:
        """The instance once no operation is in flight on it."""
        return await self.until(instance_id, lambda found: not found.task_id, within, caller)

    async def until(self, instance_id: str, predicate: Callable[[Instance], bool],
                    within: float = 20.0, caller: str = "cloud_admin") -> Instance:
        seen: list[Instance] = []

        async def reached() -> bool:
            seen[:] = [await self.get(instance_id, caller)]
            return predicate(seen[0])

        await wait_for(reached, within)
        return seen[0]

    async def close(self) -> None:
        try:
            for channel in self.channels:
                await channel.close()
            await self.sender.close()
            await stop_world(self.world)
        finally:
            self.agents.stop_all()


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if it carries none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll an async predicate until it holds (TimeoutError after `within` seconds)."""
    async with asyncio.timeout(within):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.1)


async def _nodes_up(world: World, scheduler: Service, nodes: tuple[str, ...]) -> None:
    channel = make_channel(scheduler.running.address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def ready() -> bool:
        reply = await stub.ListNodes(scheduler_pb2.ListNodesRequest(),
                                     metadata=world.metadata("cloud_admin"))
        up = {node.name for node in reply.nodes if node.state == scheduler_pb2.NODE_STATE_UP}
        return set(nodes) <= up

    try:
        await wait_for(ready, 60)
    finally:
        await channel.close()


async def build(etcd: EtcdEndpoint, redis: RedisEndpoint, tmp: Path, *,
                sync_interval: float = SYNC_INTERVAL) -> PowerCloud:
    """The cloud, its power sync every `sync_interval` seconds."""
    root = f"/test-power-{uuid.uuid4().hex[:10]}"
    key_file = tmp / "signing.pem"
    key = write_key(key_file)
    settings = service_settings(etcd.endpoint, root, key_file, redis.url)
    settings.compute.power_sync_interval = sync_interval
    settings.compute.operation_scan_interval = 0.5
    settings.compute.default_flavors = False
    store = await Store.connect([etcd.endpoint], root=root)
    world = await build_world(store, settings, key)
    agents = agent_harness.AgentLauncher(etcd, redis, root, tmp / "logs")
    try:
        # Compute calls the scheduler as the world's service user, through the catalog.
        settings.identity.port = int(world.identity.running.address.rsplit(":", 1)[1])
        settings.service_auth = ServiceAuthSettings(
            user=world.names["service"], password=SecretStr(PASSWORD),
            project=settings.auth.admin_project)
        scheduler = await start_service(scheduler_main.build, store, settings,
                                        ServiceEndpoint(host="127.0.0.1", port=0))
        world.services["scheduler"] = scheduler
        compute = await start_service(compute_main.build, store, settings,
                                      ServiceEndpoint(host="127.0.0.1", port=0))
        world.services["compute"] = compute
        sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    except BaseException:
        await stop_world(world)
        await store.close()
        raise
    cloud = PowerCloud(world, scheduler, compute, agents, sender, tmp)
    try:
        for node in NODES:
            cloud.start_agent(node)
        await _nodes_up(world, scheduler, NODES)
    except BaseException:
        await cloud.close()
        raise
    return cloud


@contextlib.asynccontextmanager
async def running(etcd: EtcdEndpoint, redis: RedisEndpoint, tmp: Path, *,
                  sync_interval: float = SYNC_INTERVAL) -> AsyncIterator[PowerCloud]:
    made = await build(etcd, redis, tmp, sync_interval=sync_interval)
    try:
        yield made
    finally:
        await made.close()
        await made.store.close()


@pytest.fixture(scope="module")
async def power_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PowerCloud]:
    """The cloud with a power sync every SYNC_INTERVAL seconds, shared by a module's tests
    (each makes instances of its own)."""
    async with running(etcd, redis, tmp_path_factory.mktemp("power")) as made:
        yield made


@pytest.fixture(scope="module")
async def quiet_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                      tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PowerCloud]:
    """The cloud with no power sync during the tests: only the verbs change instances."""
    async with running(etcd, redis, tmp_path_factory.mktemp("quiet"),
                       sync_interval=3600) as made:
        yield made
