"""A QEMU node for the compute tests: real guests booted through the whole nubis stack.

`qemu_node` adds to a compute cloud (see harness.py) one more node whose agent
drives a private libvirtd with the qemu driver (TCG) and the kernel network
dataplane, both inside a node network namespace of the test's own: the guests'
taps, the network's bridge and its dnsmasq live there and nowhere else (and, on
a node made a network node, the routers' namespaces, whose legs are ports of
the same bridges). The
nubis guest (services/client/lab/guest_image) is built once per pytest cache
and registered in the cloud's storage with guest_seed; a flavor, a network with
a DHCP subnet complete it (the flavor requires the node's trait, so its servers
land there).
The namespaces, the agent and libvirtd (and its guests) always go at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2, instance_pb2, instance_verbs_pb2
from nubis.network.v1 import network_pb2, subnet_pb2

from services.client import image_stream
from services.client.channel import make_channel
from services.client.lab import guest_image, guest_seed
from services.common import network_devices, resources
from services.compute import keys
from tests.functional import agent_harness, libvirtd
from tests.functional.compute.harness import ComputeCloud
from tests.functional.network import netns

Instance = instance_pb2.Instance
UP_MARKER = "NUBIS-GUEST-UP"
CIDR = "10.93.0.0/24"
TRAIT = "CUSTOM_QEMU_TCG"
"""The QEMU node's trait, required by the guest flavor: its servers land there."""


@dataclass
class QemuNode:
    """The node's name, namespace, libvirt URI and directories, and the cloud's guest setup."""

    cloud: ComputeCloud
    name: str
    namespace: str
    uri: str
    directory: Path
    flavor_id: str = ""
    image_id: str = ""
    network_id: str = ""
    subnet_id: str = ""

    @property
    def pool_path(self) -> Path:
        return self.directory / "pool"

    def server(self, name: str) -> Instance:
        """A server of the guest flavor (which only this node's trait fits), image and network."""
        made = Instance(meta=resource_pb2.ResourceMeta(name=name), flavor_id=self.flavor_id,
                        image_id=self.image_id, hostname=name)
        made.networks.add(network_id=self.network_id)
        return made

    def ping_from_dhcp(self, address: str) -> bool:
        """Whether `address` answers a ping sent from the network's DHCP namespace on this
        node (the network's own address on the guests' bridge)."""
        space = network_devices.dhcp_namespace(self.network_id, self.namespace)
        try:
            netns.ping(space, address, count=1)
        except AssertionError:
            return False
        return True

    def links(self) -> str:
        """The node namespace's network devices, as `ip -o link` shows them."""
        return netns.run("ip", "-n", self.namespace, "-o", "link", "show").stdout

    def port_filters(self) -> str:
        """The node's port filters, as `nft list table bridge nubis-ports` shows them."""
        return netns.run("ip", "netns", "exec", self.namespace, "nft", "list", "table",
                         "bridge", "nubis-ports", check=False).stdout

    def dhcp_hosts(self) -> str:
        """The network's dnsmasq hosts file on this node ("" once the network is gone)."""
        hosts = self.directory / "state" / "networks" / self.network_id / "hosts"
        return hosts.read_text() if hosts.exists() else ""

    def domains(self) -> list[str]:
        """The names of the domains libvirt has (asked of libvirtd itself, not the agent)."""
        conn = libvirt.open(self.uri)
        try:
            return [domain.name() for domain in conn.listAllDomains()]
        finally:
            conn.close()

    async def console(self, instance_id: str) -> str:
        reply = await self.cloud.stub().GetConsoleLog(
            instance_verbs_pb2.GetConsoleLogRequest(id=instance_id), metadata=self.cloud.admin)
        return str(reply.output)

    async def console_shows(self, instance_id: str, pattern: str, within: float = 60.0,
                            ) -> re.Match[str]:
        """The first match of `pattern` in the server's console log, polled through compute."""
        async with asyncio.timeout(within):
            while True:
                found = re.search(pattern, await self.console(instance_id))
                if found is not None:
                    return found
                await asyncio.sleep(0.5)


def agent_env(node: QemuNode, network_node: bool = False) -> dict[str, str]:
    return {
        # A network node also hosts routers: their namespaces meet the guests' bridges.
        "NUBIS_AGENT__NETWORK_NODE": "true" if network_node else "false",
        "NUBIS_AGENT__LIBVIRT_URI": node.uri,
        "NUBIS_AGENT__VIRT_TYPE": "qemu",
        # A spawn under TCG on a loaded machine can stall the heartbeat for seconds.
        "NUBIS_AGENT__LEASE_TTL": "30",
        "NUBIS_AGENT__TRAITS": json.dumps(["CUSTOM_LAB", TRAIT]),
        "NUBIS_AGENT__DATAPLANE": "kernel",
        "NUBIS_AGENT__DATAPLANE_NETNS": node.namespace,
        "NUBIS_AGENT__STATE_DIR": str(node.directory / "state"),
        "NUBIS_AGENT__CONSOLE_LOG_DIR": str(node.directory / "console"),
        **agent_harness.storage_env(node.directory, pool=f"nubis-{uuid.uuid4().hex[:6]}"),
    }


async def _register_guest(node: QemuNode, guest: guest_image.GuestImage) -> None:
    cloud = node.cloud
    channel = make_channel(cloud.base.storage_address)
    cloud.base.channels.append(channel)
    images = await guest_seed.ensure_guest(image_stream.storage_stub(channel),
                                           guest_seed.files_of(guest), metadata=cloud.admin)
    node.image_id = images.guest.meta.id
    flavor = flavor_pb2.Flavor(meta=resources.fresh_meta(resource_pb2.ResourceMeta(
        name=f"m1.tiny-{uuid.uuid4().hex[:4]}")), state=flavor_pb2.Flavor.ACTIVE, vcpus=1,
        ram_mb=192, disk_gb=1, is_public=True, extra_specs={f"trait:{TRAIT}": "required"})
    await cloud.base.store.create(keys.flavor(flavor.meta.id), flavor)
    node.flavor_id = flavor.meta.id
    stub = cloud.network_stub()
    net = await stub.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name="net-guests"))),
        metadata=cloud.admin)
    subnet = await stub.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        network_id=net.meta.id, cidr=CIDR, dhcp_enabled=True)), metadata=cloud.admin)
    node.network_id, node.subnet_id = net.meta.id, subnet.meta.id


@contextlib.asynccontextmanager
async def qemu_node(cloud: ComputeCloud, tmp_path: Path, guest: guest_image.GuestImage,
                    network_node: bool = False) -> AsyncIterator[QemuNode]:
    """The QEMU node, UP at the scheduler, with the guest registered; all of it removed after.
    As a network node (`network_node`) it hosts the cloud's routers too, their namespaces
    named after the node namespace (so they go with it)."""
    spaces = netns.Namespaces(tmp_path)
    try:
        namespace = spaces.make("node")
        with libvirtd.private_libvirtd(netns=namespace) as uri:
            node = QemuNode(cloud, f"qemu-{uuid.uuid4().hex[:6]}", namespace, uri,
                            tmp_path / "qemu-node")
            daemon = cloud.base.agents.start(node.name, agent_env(node, network_node))
            try:
                await cloud.wait_spawns(node.name)
                await _register_guest(node, guest)
                yield node
            finally:
                daemon.stop()
    finally:
        spaces.remove_all()
