"""A cloud on three "hosts": one network spans two nodes over VXLAN, another project's does not.

The controller namespace runs etcd, Redis and the five control services; two
node namespaces run one agent each (kernel dataplane, libvirt test driver),
which reach etcd and Redis at the controller's address over the switch
(`tests/multinode/hosts.py`). Each node is its own availability zone, so a
server is booted onto the node its zone names. Two servers of one project's
network, one per node, become two "guest" namespaces plugged into their
node's bridge with their port's MAC: each gets its address from its own
node's dnsmasq and they ping each other across the VXLAN between the nodes'
underlay addresses. A guest of another project's network on node B, same
CIDR, is not reached from node A's guest, nor reaches it.
Runs as root; skips otherwise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    compute_service_pb2_grpc,
    flavor_pb2,
    instance_pb2,
    instance_requests_pb2,
)
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.network.v1 import network_pb2, network_service_pb2_grpc, port_pb2, subnet_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from nubis.storage.v1 import image_pb2

from services.client import image_stream
from services.client.channel import make_channel
from services.client.lab import components, runner, seed
from services.client.lab.components import LabPlan
from services.common import network_devices
from tests.functional.network import netns
from tests.multinode.hosts import Hosts, kill_leftovers, start_cloud, tag

pytestmark = [
    pytest.mark.multinode,
    pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or ""),
    pytest.mark.timeout(240),
]

CIDR = "10.93.0.0/24"
"""Both projects' subnets: the same addresses, kept apart only by their networks."""
PASSWORD = "multinode-password-1"
Instance = instance_pb2.Instance


@dataclass
class Cloud:
    """The running cloud and the test's way in: the controller's address, tokens by project."""

    hosts: Hosts
    plan: LabPlan
    tokens: dict[str, str]

    def endpoint(self, service: str) -> str:
        return f"{self.plan.ports.host}:{self.plan.ports.services[service].port}"

    def channel(self, service: str, project: str = "admin") -> grpc.aio.Channel:
        return make_channel(self.endpoint(service), token=self.tokens[project])


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts.make(tmp_path)
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
async def cloud(hosts: Hosts, tmp_path: Path) -> AsyncIterator[Cloud]:
    state_dir = tmp_path / "cloud"
    try:
        plan = await start_cloud(hosts, state_dir)
        admin = json.loads((plan.state_dir / components.ADMIN_CREDENTIALS).read_text())
        yield Cloud(hosts, plan, {"admin": str(admin["token"])})
    finally:
        # Exactly the processes recorded in lab.json, before their namespaces go; then
        # what they left running under this test's own directory (the nodes' dnsmasqs).
        runner.down(state_dir, grace=3)
        kill_leftovers(state_dir)


async def _other_project(cloud: Cloud) -> None:
    """Project `other` with a member, whose token the cloud keeps under "other"."""
    async with cloud.channel("identity") as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        project = await stub.CreateProject(identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(name="other"))))
        user = await stub.CreateUser(identity_pb2.CreateUserRequest(
            user=identity_pb2.User(meta=resource_pb2.ResourceMeta(name=f"u-{tag()}")),
            password=PASSWORD))
        await stub.GrantRole(identity_pb2.GrantRoleRequest(
            user_id=user.meta.id, project_id=project.meta.id, role="member"))
        reply = await stub.Authenticate(identity_pb2.AuthenticateRequest(
            username=user.meta.name, password=PASSWORD, project="other"))
    cloud.tokens["other"] = str(reply.token)


async def _nodes_up(cloud: Cloud, within: float = 60) -> list[scheduler_pb2.Node]:
    async with cloud.channel("scheduler") as channel, asyncio.timeout(within):
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        while True:
            nodes = (await stub.ListNodes(scheduler_pb2.ListNodesRequest())).nodes
            if len([n for n in nodes if n.state == scheduler_pb2.NODE_STATE_UP]) == 2:
                return list(nodes)
            await asyncio.sleep(0.3)


async def _network(cloud: Cloud, project: str) -> str:
    async with cloud.channel("network", project) as channel:
        stub = network_service_pb2_grpc.NetworkServiceStub(channel)
        net = await stub.CreateNetwork(network_pb2.CreateNetworkRequest(
            network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name=f"n-{tag()}"))))
        await stub.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
            network_id=net.meta.id, cidr=CIDR, dhcp_enabled=True)))
    return str(net.meta.id)


async def _boot_args(cloud: Cloud) -> tuple[str, str]:
    """The lab image and the m1.tiny flavor."""
    async with cloud.channel("storage") as channel:
        images = await image_stream.storage_stub(channel).ListImages(
            image_pb2.ListImagesRequest(filter=f"name={seed.IMAGE_NAME}"))
    async with cloud.channel("compute") as channel:
        flavors = await compute_service_pb2_grpc.ComputeServiceStub(channel).ListFlavors(
            flavor_pb2.ListFlavorsRequest())
    flavor = next(f for f in flavors.flavors if f.meta.name == "m1.tiny")
    return str(images.images[0].meta.id), str(flavor.meta.id)


async def _boot(cloud: Cloud, project: str, zone: str, network_id: str, fixed_ip: str,
                image_id: str, flavor_id: str) -> port_pb2.Port:
    """A server in `zone` with one NIC at `fixed_ip`; its port once ACTIVE on the node."""
    made = Instance(meta=resource_pb2.ResourceMeta(name=f"vm-{tag()}"), flavor_id=flavor_id,
                    image_id=image_id, availability_zone=zone)
    made.networks.add(network_id=network_id, fixed_ip=fixed_ip)
    async with cloud.channel("compute", project) as channel, asyncio.timeout(60):
        stub = compute_service_pb2_grpc.ComputeServiceStub(channel)
        created = await stub.CreateInstance(instance_requests_pb2.CreateInstanceRequest(
            instance=made))
        while True:
            found = await stub.GetInstance(instance_requests_pb2.GetInstanceRequest(
                id=created.meta.id))
            if found.state == Instance.ERROR:
                raise AssertionError(f"server in {zone} failed: {found.fault}")
            if found.state == Instance.ACTIVE and not found.task_id:
                break
            await asyncio.sleep(0.3)
    async with cloud.channel("network") as channel, asyncio.timeout(30):
        stub_n = network_service_pb2_grpc.NetworkServiceStub(channel)
        while True:
            port = await stub_n.GetPort(port_pb2.GetPortRequest(id=found.port_ids[0]))
            if port.state == port_pb2.Port.ACTIVE:
                return port
            await asyncio.sleep(0.3)


def _guest(cloud: Cloud, role: str, network_id: str, port: port_pb2.Port, name: str) -> str:
    """A guest namespace on `port`'s bridge of node `role`, holding its DHCP lease."""
    guest = cloud.hosts.spaces.attach_guest(cloud.hosts.namespaces[role],
                                            network_devices.bridge(network_id), name,
                                            port.mac_address)
    assert cloud.hosts.spaces.dhcp(guest)["ip"] == port.fixed_ips[0].ip_address
    return guest


def _vxlan(cloud: Cloud, role: str, network_id: str) -> tuple[str, str]:
    """The VXLAN of `network_id` on node `role`: its local address and its flood list."""
    namespace, device = cloud.hosts.namespaces[role], network_devices.vxlan(network_id)
    shown = json.loads(netns.run("ip", "-n", namespace, "-j", "-d", "link", "show", device)
                       .stdout)[0]
    flood = netns.run("bridge", "-n", namespace, "fdb", "show", "dev", device).stdout
    return str(shown["linkinfo"]["info_data"]["local"]), flood


def _tunnelled(cloud: Cloud, role: str, network_id: str) -> int:
    """Packets node `role` has sent into the VXLAN of `network_id` (encapsulated to a peer)."""
    shown = netns.run("ip", "-n", cloud.hosts.namespaces[role], "-j", "-s", "link", "show",
                      network_devices.vxlan(network_id)).stdout
    return int(json.loads(shown)[0]["stats64"]["tx"]["packets"])


def _unreached(source: str, address: str) -> bool:
    done = netns.run("ip", "netns", "exec", source, "busybox", "ping", "-c", "2", "-W", "1",
                     address, check=False)
    return done.returncode != 0


async def test_one_network_spans_two_nodes_over_vxlan_and_another_projects_is_apart(
        cloud: Cloud) -> None:
    nodes = await _nodes_up(cloud)
    assert {(n.availability_zone, n.name) for n in nodes} == {("zone-a", "node-1"),
                                                              ("zone-b", "node-2")}
    await _other_project(cloud)
    image_id, flavor_id = await _boot_args(cloud)
    ours, theirs = await _network(cloud, "admin"), await _network(cloud, "other")
    on_a, on_b, other_b = await asyncio.gather(
        _boot(cloud, "admin", "zone-a", ours, "10.93.0.11", image_id, flavor_id),
        _boot(cloud, "admin", "zone-b", ours, "10.93.0.12", image_id, flavor_id),
        _boot(cloud, "other", "zone-b", theirs, "10.93.0.13", image_id, flavor_id))
    assert (on_a.node, on_b.node, other_b.node) == ("node-1", "node-2", "node-2")

    # Each node's VXLAN of the network starts at its own underlay address, floods to the other.
    address_a, address_b = cloud.hosts.address("a"), cloud.hosts.address("b")
    local, flood = _vxlan(cloud, "a", ours)
    assert local == address_a and f"dst {address_b}" in flood
    local, flood = _vxlan(cloud, "b", ours)
    assert local == address_b and f"dst {address_a}" in flood
    # The other project's network is on node B alone: nobody to flood to.
    assert "dst" not in _vxlan(cloud, "b", theirs)[1]

    guest_a = _guest(cloud, "a", ours, on_a, "mn-guest-a")
    guest_b = _guest(cloud, "b", ours, on_b, "mn-guest-b")
    guest_other = _guest(cloud, "b", theirs, other_b, "mn-guest-other")
    sent = _tunnelled(cloud, "a", ours), _tunnelled(cloud, "b", ours)
    netns.ping(guest_a, "10.93.0.12", count=2)
    netns.ping(guest_b, "10.93.0.11", count=2)
    # The echoes went through each node's VXLAN device (the node namespaces share only the
    # underlay): at least the two requests and two replies of each ping, each way.
    assert _tunnelled(cloud, "a", ours) - sent[0] >= 4
    assert _tunnelled(cloud, "b", ours) - sent[1] >= 4
    assert _unreached(guest_a, "10.93.0.13")
    assert _unreached(guest_other, "10.93.0.11")
