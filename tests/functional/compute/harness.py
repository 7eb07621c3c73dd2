"""A cloud for the compute tests: identity, scheduler, storage, network, compute and two agents.

Everything runs as its main builds it, over real gRPC, etcd and Redis; the two
agents are `nubis-agent` subprocesses on the libvirt test driver (the volume
tests' cloud, `volume_harness.build`, plus network and compute). Compute runs
in-process, or as processes of its own (`start_compute_process`) for tests
that kill it. The admin project (where the cloud-admin acts) gets unlimited
quota, a flavor, a public image and a network with a subnet.

`leftovers` counts what servers can leak: domains on each node (asked of the
agents), volumes, ports, claims and the project's usage.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    compute_service_pb2_grpc,
    flavor_pb2,
    instance_pb2,
    instance_requests_pb2,
)
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import network_pb2, network_service_pb2_grpc, port_pb2, subnet_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from nubis.storage.v1 import volume_pb2

from services.client.channel import CallPolicy, make_channel
from services.client.lab import daemons
from services.common import quota, resources, tasks
from services.common.settings import ServiceEndpoint
from services.compute import keys
from services.compute import main as compute_main
from services.network import main as network_main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.authz.world import Service, start_service
from tests.functional.storage import volume_harness
from tests.functional.storage.volume_harness import Metadata, VolumeCloud

Instance = instance_pb2.Instance
FINAL = (Instance.ACTIVE, Instance.ERROR)
NODES = volume_harness.NODES


@dataclass
class Leftovers:
    """What servers could leave behind, counted from the services and the agents."""

    domains: dict[str, list[str]]
    volumes: list[str]
    ports: list[str]
    claims: list[str]
    usage: dict[str, int]

    def empty(self) -> bool:
        return (not any(self.domains.values()) and not self.volumes and not self.ports
                and not self.claims and not any(self.usage.get(name, 0) for name in
                                                ("instances", "vcpus", "ram_mb")))


@dataclass
class ComputeCloud:
    """The running parts, the admin project's flavor, image and network, and helpers."""

    base: VolumeCloud
    network: Service
    compute: list[Service] = field(default_factory=list)
    processes: list[daemons.Daemon] = field(default_factory=list)
    flavor_id: str = ""
    image_id: str = ""
    network_id: str = ""
    compute_port: int = 0

    @property
    def admin(self) -> Metadata:
        return self.base.admin

    @property
    def project(self) -> str:
        return self.base.admin_project

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = make_channel(address, policy=CallPolicy(max_attempts=1))
        self.base.channels.append(channel)
        return channel

    @property
    def compute_address(self) -> str:
        if self.compute:
            return self.compute[0].running.address
        return f"127.0.0.1:{self.compute_port}"

    def stub(self, address: str = "") -> compute_service_pb2_grpc.ComputeServiceAsyncStub:
        return compute_service_pb2_grpc.ComputeServiceStub(
            self._channel(address or self.compute_address))

    def network_stub(self) -> network_service_pb2_grpc.NetworkServiceAsyncStub:
        return network_service_pb2_grpc.NetworkServiceStub(
            self._channel(self.network.running.address))

    def scheduler_stub(self) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(
            self._channel(self.base.scheduler.running.address))

    def server(self, name: str = "", **fields: object) -> Instance:
        """The requested shape of a server of the admin project's flavor, image and network."""
        made = Instance(meta=resource_pb2.ResourceMeta(name=name or f"vm-{uuid.uuid4().hex[:6]}"),
                        flavor_id=self.flavor_id, image_id=self.image_id)
        made.networks.add(network_id=self.network_id)
        for key, value in fields.items():
            setattr(made, key, value)
        return made

    async def create(self, made: Instance | None = None, *, request_id: str = "",
                     stub: compute_service_pb2_grpc.ComputeServiceAsyncStub | None = None,
                     ) -> Instance:
        reply: Instance = await (stub or self.stub()).CreateInstance(
            instance_requests_pb2.CreateInstanceRequest(instance=made or self.server(),
                                                        request_id=request_id),
            metadata=self.admin)
        return reply

    async def get(self, instance_id: str) -> Instance | None:
        try:
            found: Instance = await self.stub().GetInstance(
                instance_requests_pb2.GetInstanceRequest(id=instance_id), metadata=self.admin)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return found

    async def wait_final(self, instance_id: str, within: float = 60.0) -> Instance:
        """The instance once it is ACTIVE or ERROR with no operation in flight."""
        async with asyncio.timeout(within):
            while True:
                found = await self.get(instance_id)
                if found is not None and found.state in FINAL and not found.task_id:
                    return found
                await asyncio.sleep(0.2)

    async def delete(self, instance_id: str) -> None:
        await self.stub().DeleteInstance(
            instance_requests_pb2.DeleteInstanceRequest(id=instance_id), metadata=self.admin)

    async def wait_gone(self, instance_id: str, within: float = 60.0) -> None:
        async with asyncio.timeout(within):
            while True:
                if await self.get(instance_id) is None:
                    return
                await asyncio.sleep(0.2)

    async def domains(self, node: str) -> list[tasks_pb2.DomainStatus]:
        """The node's domains, asked of its agent (its libvirt), not read from etcd."""
        reply = await self.base.sender.send(node, tasks.LIST_DOMAINS,
                                            tasks_pb2.ListDomainsRequest(),
                                            operation_id=tasks.new_operation_id())
        return list(reply.domains)

    async def domain_state(self, node: str, instance_id: str) -> str:
        reply = await self.base.sender.send(
            node, tasks.DOMAIN_STATUS,
            tasks_pb2.DomainStatusRequest(name=f"instance-{instance_id}"),
            operation_id=tasks.new_operation_id())
        return str(reply.state)

    async def leftovers(self, instance_ids: Iterable[str]) -> Leftovers:
        domains = {node: [d.name for d in await self.domains(node)
                          if d.name.startswith("instance-")] for node in NODES}
        volumes = await self.base.stub().ListVolumes(
            volume_pb2.ListVolumesRequest(page_size=1000, all_projects=True),
            metadata=self.admin)
        ports = await self.network_stub().ListPorts(
            port_pb2.ListPortsRequest(page_size=1000, all_projects=True), metadata=self.admin)
        claims = []
        scheduler = self.scheduler_stub()
        for instance_id in instance_ids:
            try:
                await scheduler.GetAllocations(
                    scheduler_pb2.GetAllocationsRequest(consumer_id=instance_id),
                    metadata=self.admin)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                claims.append(instance_id)
        usage, _ = await quota.in_use(self.base.store, self.project)
        return Leftovers(
            domains=domains,
            volumes=[v.meta.id for v in volumes.volumes if v.root_disk_of_instance_id],
            ports=[p.meta.id for p in ports.ports if p.device_owner.startswith("compute:")],
            claims=claims, usage=usage)

    async def wait_clean(self, instance_ids: Iterable[str], within: float = 30.0) -> Leftovers:
        """Leftovers once empty (the last count, failing, if they never empty)."""
        ids = list(instance_ids)
        loop = asyncio.get_running_loop()
        ends = loop.time() + within
        while True:
            found = await self.leftovers(ids)
            if found.empty() or loop.time() > ends:
                return found
            await asyncio.sleep(0.5)

    async def restart_agent(self, node: str, **env: str) -> None:
        """Stop `node`'s agent and start it again with `env` (e.g. NUBIS_AGENT__VIRT_TYPE)."""
        agents = self.base.agents
        for daemon in [d for d in agents.started if d.name == f"agent-{node}" and d.alive()]:
            daemon.stop()
        agents.start(node, env)
        await self.wait_spawns(node)

    async def wait_spawns(self, node: str, within: float = 60.0) -> None:
        """Until `node`'s agent answers and the scheduler has it UP with its pool."""
        scheduler = self.scheduler_stub()
        async with asyncio.timeout(within):
            while True:
                try:
                    await self.domains(node)
                    found = await scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=node),
                                                    metadata=self.admin)
                    if found.state == scheduler_pb2.NODE_STATE_UP and found.pools:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.3)

    # --- compute as processes of their own ---

    def compute_env(self) -> dict[str, str]:
        env = self.base.storage_env()
        env.update({
            "NUBIS_COMPUTE__HOST": "127.0.0.1",
            "NUBIS_COMPUTE__PORT": str(self.compute_port),
            "NUBIS_COMPUTE__OPERATION_LEASE_TTL": "3",
            "NUBIS_COMPUTE__OPERATION_SCAN_INTERVAL": "0.5",
            "NUBIS_COMPUTE__DEFAULT_FLAVORS": "false",
        })
        return env

    def start_compute_process(self, port: int = 0) -> daemons.Daemon:
        """`nubis-compute` as a process (port: another replica's, else the cloud's)."""
        env = self.compute_env()
        env["NUBIS_COMPUTE__METRICS_PORT"] = str(daemons.free_port())
        if port:
            env["NUBIS_COMPUTE__PORT"] = str(port)
        chosen = port or self.compute_port
        argv = [sys.executable, "-m", "services.compute.main"]
        proc = daemons.spawn("compute", argv,
                             self.base.log_dir / f"compute-{uuid.uuid4().hex[:4]}.log", env=env)
        daemons.wait_for_port("127.0.0.1", chosen, 30, proc.proc, proc.log_path)
        self.processes.append(proc)
        return proc

    def kill(self, proc: daemons.Daemon) -> None:
        """SIGKILL: nothing recorded on the way out."""
        proc.proc.kill()
        proc.proc.wait(10)
        self.processes.remove(proc)

    async def close(self) -> None:
        try:
            for service in self.compute:
                await service.stop()
            await self.network.stop()
        finally:
            for proc in self.processes:
                proc.stop()
            await self.base.close()


async def _seed(cloud: ComputeCloud) -> None:
    store = cloud.base.store
    limits = {name: quota.UNLIMITED for name in quota.RESOURCES}
    await store.create(quota.quota_key(cloud.project),
                       identity_pb2.Quota(project_id=cloud.project, limits=limits))
    flavor = flavor_pb2.Flavor(meta=resources.fresh_meta(resource_pb2.ResourceMeta(
        name=f"t1-{uuid.uuid4().hex[:4]}")), state=flavor_pb2.Flavor.ACTIVE, vcpus=1,
        ram_mb=64, disk_gb=1, is_public=True)
    await store.create(keys.flavor(flavor.meta.id), flavor)
    cloud.flavor_id = flavor.meta.id
    cloud.image_id = await volume_harness.active_image(cloud.base, public=True)
    net_stub = cloud.network_stub()
    net = await net_stub.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name="net-c"))),
        metadata=cloud.admin)
    await net_stub.CreateSubnet(subnet_pb2.CreateSubnetRequest(
        subnet=subnet_pb2.Subnet(network_id=net.meta.id, cidr="10.20.0.0/22")),
        metadata=cloud.admin)
    cloud.network_id = net.meta.id


async def build(etcd: EtcdEndpoint, redis: RedisEndpoint, tmp_path: Path, *,
                in_process: bool = True) -> ComputeCloud:
    base = await volume_harness.build(etcd, redis, tmp_path)
    try:
        settings = base.settings
        net_settings = settings.model_copy(update={
            "network": ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=None)})
        network = await start_service(network_main.build, base.store, net_settings,
                                      net_settings.network)
    except BaseException:
        await base.close()
        raise
    cloud = ComputeCloud(base, network, compute_port=daemons.free_port())
    try:
        settings.compute.host = "127.0.0.1"
        settings.compute.port = 0
        settings.compute.metrics_port = None
        settings.compute.operation_lease_ttl = 3
        settings.compute.operation_scan_interval = 0.5
        settings.compute.default_flavors = False
        if in_process:
            cloud.compute.append(await start_service(compute_main.build, base.store, settings,
                                                     settings.compute))
        await _seed(cloud)
    except BaseException:
        await cloud.close()
        raise
    return cloud


@pytest.fixture
async def cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                tmp_path: Path) -> AsyncIterator[ComputeCloud]:
    made = await build(etcd, redis, tmp_path)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def bare_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                     tmp_path: Path) -> AsyncIterator[ComputeCloud]:
    """The cloud without compute: the test runs compute as processes it may kill."""
    made = await build(etcd, redis, tmp_path, in_process=False)
    try:
        yield made
    finally:
        await made.close()
