"""A small cloud for the volume tests: identity, a scheduler, storage and two real agents.

Identity, the scheduler and storage run in-process as their mains build them
(token checks, catalog entries, service-to-service calls with the service
credential); storage can also run as a subprocess (`start_storage_process`)
for tests that kill it. The agents are `nubis-agent` subprocesses on the
libvirt test driver. `ask_agent` asks a node's agent (its libvirt) directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis as redis_client
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc, volume_pb2
from pydantic import SecretStr

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import tasks
from services.common.settings import ServiceAuthSettings, ServiceEndpoint, Settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from services.identity import bootstrap
from services.identity import main as identity_main
from services.scheduler import main as scheduler_main
from services.storage import main as storage_main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness
from tests.functional.authz.world import (
    ADMIN_PASSWORD,
    PASSWORD,
    Service,
    service_settings,
    start_service,
    write_key,
)
from tests.functional.storage.harness import raw_bytes, upload_messages

SERVICE_PASSWORD = "service-password-for-volume-tests"
NODES = ("vol-node-1", "vol-node-2")
GIB = 1024**3
Volume = volume_pb2.Volume
Metadata = tuple[tuple[str, str], ...]


@dataclass
class VolumeCloud:
    """The running parts and what a test calls them with."""

    store: Store
    settings: Settings
    identity: Service
    scheduler: Service
    agents: agent_harness.AgentLauncher
    sender: TaskSender
    log_dir: Path
    storage: Service | None = None
    storage_process: daemons.Daemon | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    admin: Metadata = ()
    admin_project: str = ""

    def stub(self, address: str = "") -> storage_service_pb2_grpc.StorageServiceAsyncStub:
        channel = make_channel(address or self.storage_address,
                               policy=CallPolicy(max_attempts=1))
        self.channels.append(channel)
        return storage_service_pb2_grpc.StorageServiceStub(channel)

    @property
    def storage_address(self) -> str:
        if self.storage is not None:
            return self.storage.running.address
        return f"127.0.0.1:{self.settings.storage.port}"

    @property
    def identity_stub(self) -> identity_pb2_grpc.IdentityServiceAsyncStub:
        channel = make_channel(self.identity.running.address)
        self.channels.append(channel)
        return identity_pb2_grpc.IdentityServiceStub(channel)

    async def member_of_new_project(self, name: str) -> tuple[str, Metadata]:
        """A fresh project and a member's token in it."""
        stub = self.identity_stub
        suffix = uuid.uuid4().hex[:6]
        project = await stub.CreateProject(identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(
                name=f"{name}-{suffix}"))), metadata=self.admin)
        user = await stub.CreateUser(identity_pb2.CreateUserRequest(
            user=identity_pb2.User(meta=resource_pb2.ResourceMeta(name=f"{name}-u-{suffix}")),
            password=PASSWORD), metadata=self.admin)
        await stub.GrantRole(identity_pb2.GrantRoleRequest(
            user_id=user.meta.id, project_id=project.meta.id, role="member"),
            metadata=self.admin)
        login = await stub.Authenticate(identity_pb2.AuthenticateRequest(
            username=f"{name}-u-{suffix}", password=PASSWORD, project=project.meta.id))
        return project.meta.id, (("authorization", f"Bearer {login.token}"),)

    async def ask_agent(self, node: str, name: str,
                        pool: str = "") -> tasks_pb2.VolumeInfoResponse:
        """The volume `name` as the node's libvirt reports it (not storage's record)."""
        return await self.sender.send(node, tasks.VOLUME_INFO,
                                      tasks_pb2.VolumeInfoRequest(pool=pool, name=name),
                                      operation_id=tasks.new_operation_id())

    def storage_env(self, **extra: str) -> dict[str, str]:
        """The environment of a storage subprocess over this cloud's etcd, Redis and identity."""
        env = dict(os.environ)
        env.update({
            "NUBIS_ETCD__ENDPOINTS": json.dumps(self.settings.etcd.endpoints),
            "NUBIS_ETCD__PREFIX": self.settings.etcd.prefix,
            "NUBIS_REDIS_URL": self.settings.redis_url,
            "NUBIS_IDENTITY__PORT": str(self.settings.identity.port),
            "NUBIS_STORAGE__PORT": str(self.settings.storage.port),
            "NUBIS_STORAGE__IMAGE_DIR": self.settings.storage.image_dir,
            "NUBIS_SERVICE_AUTH__PASSWORD": SERVICE_PASSWORD,
            "NUBIS_LOG_JSON": "false",
        })
        env.update(extra)
        return env

    def start_storage_process(self, **extra: str) -> daemons.Daemon:
        """`nubis-storage` as a process of its own (stop it with `kill_storage_process`)."""
        argv = [sys.executable, "-m", "services.storage.main"]
        self.storage_process = daemons.spawn(
            "storage", argv, self.log_dir / f"storage-{uuid.uuid4().hex[:4]}.log",
            env=self.storage_env(**extra))
        daemons.wait_for_port("127.0.0.1", self.settings.storage.port, 30,
                              self.storage_process.proc, self.storage_process.log_path)
        return self.storage_process

    def kill_storage_process(self) -> None:
        """SIGKILL: no shutdown, no cleanup, nothing recorded on the way out."""
        assert self.storage_process is not None
        self.storage_process.proc.kill()
        self.storage_process.proc.wait(10)
        self.storage_process = None

    async def close(self) -> None:
        try:
            for channel in self.channels:
                await channel.close()
            if self.storage is not None:
                await self.storage.stop()
            await self.sender.close()
            await self.scheduler.stop()
            await self.identity.stop()
        finally:  # whatever failed above, no process of ours outlives the test
            if self.storage_process is not None:
                self.storage_process.stop()
            self.agents.stop_all()


async def active_image(cloud: VolumeCloud, *, public: bool = False, size: int = 1 << 20) -> str:
    """An ACTIVE raw image made and uploaded by the cloud-admin (public if asked)."""
    stub = cloud.stub()
    made = image_pb2.Image(meta=resource_pb2.ResourceMeta(name=f"img-{uuid.uuid4().hex[:6]}"),
                           disk_format=image_pb2.Image.DISK_FORMAT_RAW)
    if public:
        made.visibility = image_pb2.Image.VISIBILITY_PUBLIC
    image = await stub.CreateImage(image_pb2.CreateImageRequest(image=made),
                                   metadata=cloud.admin)
    data = raw_bytes(size)
    header = image_pb2.ImageUploadHeader(image_id=image.meta.id, size_bytes=len(data),
                                         checksum_sha256=hashlib.sha256(data).hexdigest())
    active = await stub.UploadImage(upload_messages(header, data), metadata=cloud.admin)
    assert active.state == image_pb2.Image.ACTIVE
    return str(image.meta.id)


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll an async predicate until it holds (TimeoutError after `within` seconds)."""
    async with asyncio.timeout(within):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.1)


async def wait_state(stub: Any, volume_id: str, metadata: Metadata, states: set[int],
                     within: float = 30.0) -> Volume:
    """Poll GetVolume until the volume is in one of `states`."""
    found: list[Volume] = []

    async def reached() -> bool:
        volume = await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id),
                                      metadata=metadata)
        found[:] = [volume]
        return volume.state in states

    await wait_for(reached, within)
    return found[0]


async def wait_gone(stub: Any, volume_id: str, metadata: Metadata, within: float = 30.0) -> None:
    async def gone() -> bool:
        try:
            await stub.GetVolume(volume_pb2.GetVolumeRequest(id=volume_id), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    await wait_for(gone, within)


def forget_queued_tasks(redis_url: str, nodes: tuple[str, ...]) -> None:
    """Drop tasks an earlier test's cloud left for these node names (queued or unacked).

    Every cloud of the session names its nodes alike on one Redis, so a task a
    killed agent of an earlier test never finished (a spawn, say) would
    otherwise run on this cloud's fresh agent and leave a domain nobody made.
    """
    queues = {tasks.queue_name(node) for node in nodes}
    client = redis_client.Redis.from_url(redis_url)
    try:
        for queue in queues:
            for key in client.scan_iter(match=f"{queue}*"):
                client.delete(key)
        for tag, raw in client.hgetall("unacked").items():
            with contextlib.suppress(ValueError, TypeError, IndexError):
                if json.loads(raw)[2] in queues:
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
    finally:
        client.close()


async def build(etcd: EtcdEndpoint, redis: RedisEndpoint, tmp_path: Path, *,
                in_process_storage: bool = True) -> VolumeCloud:
    root = f"/test-vol-{uuid.uuid4().hex[:10]}"
    key_file = tmp_path / "signing.pem"
    write_key(key_file)
    settings = service_settings(etcd.endpoint, root, key_file, redis.url)
    settings.identity = ServiceEndpoint(host="127.0.0.1", port=0)
    settings.storage.host = "127.0.0.1"
    settings.storage.port = 0 if in_process_storage else daemons.free_port()
    settings.storage.metrics_port = None
    settings.storage.image_dir = str(tmp_path / "images")
    settings.storage.operation_lease_ttl = 3
    settings.storage.operation_scan_interval = 0.5
    settings.service_auth = ServiceAuthSettings(password=SecretStr(SERVICE_PASSWORD))
    store = await Store.connect([etcd.endpoint], root=root)
    admin = await bootstrap.ensure_admin(store, settings.auth, ADMIN_PASSWORD)
    await bootstrap.ensure_service_user(store, settings.auth, settings.service_auth,
                                        SERVICE_PASSWORD)
    identity = await start_service(identity_main.build, store, settings, settings.identity)
    # Bound on a free port; every other part dials identity there.
    settings.identity.port = int(identity.running.address.rsplit(":", 1)[1])
    scheduler = await start_service(scheduler_main.build, store, settings,
                                    ServiceEndpoint(host="127.0.0.1", port=0))
    log_dir = tmp_path / "logs"
    forget_queued_tasks(redis.url, NODES)
    agents = agent_harness.AgentLauncher(etcd, redis, root, log_dir, env={
        "NUBIS_IDENTITY__PORT": str(settings.identity.port),
        "NUBIS_SERVICE_AUTH__PASSWORD": SERVICE_PASSWORD,
        # A pool defined by a test shows in the node's report within seconds.
        "NUBIS_AGENT__FACTS_INTERVAL": "1",
    })
    for node in NODES:
        agents.start(node)
    try:
        sender = await TaskSender.connect(SenderConfig.from_settings(settings))
    except BaseException:
        agents.stop_all()
        raise
    cloud = VolumeCloud(store, settings, identity, scheduler, agents, sender, log_dir,
                        admin_project=admin.project_id)
    try:
        await _finish_build(cloud, in_process_storage)
    except BaseException:
        await cloud.close()
        raise
    return cloud


async def _finish_build(cloud: VolumeCloud, in_process_storage: bool) -> None:
    settings, store = cloud.settings, cloud.store
    login = await cloud.identity_stub.Authenticate(identity_pb2.AuthenticateRequest(
        username="admin", password=ADMIN_PASSWORD, project=settings.auth.admin_project))
    cloud.admin = (("authorization", f"Bearer {login.token}"),)
    if in_process_storage:
        cloud.storage = await start_service(storage_main.build, store, settings,
                                            settings.storage)
    await _wait_for_pools(cloud)


async def _wait_for_pools(cloud: VolumeCloud) -> None:
    """Until both nodes are UP at the scheduler with a reported storage pool."""
    channel = make_channel(cloud.scheduler.running.address)
    cloud.channels.append(channel)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def ready() -> bool:
        reply = await stub.ListNodes(scheduler_pb2.ListNodesRequest(), metadata=cloud.admin)
        up = [node for node in reply.nodes
              if node.state == scheduler_pb2.NODE_STATE_UP and node.pools]
        return len(up) == len(NODES)

    await wait_for(ready, 60)


@pytest.fixture
async def cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                tmp_path: Path) -> AsyncIterator[VolumeCloud]:
    made = await build(etcd, redis, tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def bare_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                     tmp_path: Path) -> AsyncIterator[VolumeCloud]:
    """The cloud without a storage service: the test runs storage as a process."""
    made = await build(etcd, redis, tmp_path, in_process_storage=False)
    try:
        yield made
    finally:
        await made.close()
