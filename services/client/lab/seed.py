"""What `nubis lab up` puts in a new cloud so a newcomer can start at once: an image, the
admin project's private network, an external network and a router between them. Run
again, it finds them and makes nothing twice. The flavors are compute's own defaults
(written when it first starts); the lab only names them.

The image is made here, not downloaded (a lab may have no way out): a 1 GiB qcow2
whose boot sector writes "nubis lab guest: booted" to the first serial port and
halts, so a guest booted from it shows that line in its console log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import compute_service_pb2_grpc, flavor_pb2
from nubis.network.v1 import network_pb2, network_service_pb2_grpc, router_pb2, subnet_pb2
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client import image_stream, rpc_errors
from services.client.channel import make_channel
from services.client.commands import image as image_cli

if TYPE_CHECKING:
    from services.client.lab.components import PostStartContext

    ComputeStub = compute_service_pb2_grpc.ComputeServiceAsyncStub
    NetworkStub = network_service_pb2_grpc.NetworkServiceAsyncStub
    StorageStub = storage_service_pb2_grpc.StorageServiceAsyncStub
T = TypeVar("T")

IMAGE_NAME = "lab-hello"
IMAGE_FILE = "lab-hello.qcow2"
IMAGE_VIRTUAL_SIZE = "1G"
PRIVATE_NETWORK = "private"
PRIVATE_SUBNET = "private-subnet"
PRIVATE_CIDR = "10.0.0.0/24"
PUBLIC_NETWORK = "public"
PUBLIC_SUBNET = "public-subnet"
# TEST-NET-3 (RFC 5737): documentation addresses, never someone's real ones.
PUBLIC_CIDR = "203.0.113.0/24"
PUBLIC_POOL = ("203.0.113.10", "203.0.113.250")
ROUTER = "router1"
# The network service's reason when no UP node is flagged agent.network_node.
NO_NETWORK_NODE = "nubis.router.no_network_node"
# Seconds to wait for the first agent's node to be UP as a network node.
NODE_WAIT = 30.0
# Identity's reason for a login refused by its throttle, and how long the seeding waits
# at most for the service credential to be let in again.
THROTTLED = "nubis.auth.throttled"
THROTTLE_WAIT = 70.0
_CHUNK = 1024 * 1024
_MESSAGE = b"nubis lab guest: booted\r\n\0"
# x86 real mode, loaded at 0x7c00: cld; ds=0; si=message; dx=COM1; print bytes up to
# the NUL with `out`; then hlt forever.
_BOOT_CODE = bytes.fromhex("fc31c08ed8be167cbaf803ac84c07403eeebf8f4ebfd")


def boot_sector() -> bytes:
    """The 512-byte MBR of the lab image."""
    sector = (_BOOT_CODE + _MESSAGE).ljust(510, b"\0") + b"\x55\xaa"
    assert len(sector) == 512
    return sector


def make_image(target: Path, qemu_img: str = "qemu-img") -> Path:
    """Write the lab image to `target` (kept: made once per state dir)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        raw = Path(scratch) / "disk.raw"
        with raw.open("wb") as handle:
            handle.write(boot_sector())
            handle.truncate(_CHUNK)
        staged = Path(scratch) / target.name
        for argv in ([qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                      str(staged)],
                     [qemu_img, "resize", "-q", "-f", "qcow2", str(staged), IMAGE_VIRTUAL_SIZE]):
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        staged.replace(target)
    return target


@dataclass
class Seeder:
    """One seeding run: the lab's endpoints, the admin's token, where to say what it did."""

    ctx: PostStartContext

    def token(self) -> str:
        session = json.loads((self.ctx.plan.state_dir / "credentials.json").read_text())
        return str(session["token"])

    def say(self, text: str) -> None:
        self.ctx.console.print(text, soft_wrap=True)

    def run(self, service: str, stub_type: Callable[[grpc.aio.Channel], Any],
            action: Callable[[Any], Awaitable[T]]) -> T | None:
        """`action(stub)` against the lab's `service`; None if that service cannot do it yet."""
        async def go() -> T:
            async with make_channel(self.ctx.endpoint(service), settings=self.ctx.tls(),
                                    token=self.token()) as channel:
                return await action(stub_type(channel))
        deadline = time.monotonic() + THROTTLE_WAIT
        while True:
            try:
                # Post-start steps run inside `up`'s event loop: this one gets a loop of its own.
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                    return pool.submit(asyncio.run, go()).result()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.say(f"nubis-{service} cannot seed the lab yet ({exc.details()}); "
                             "skipped")
                    return None
                failed = rpc_errors.domain_error(exc, service)
                if failed.reason != THROTTLED or time.monotonic() > deadline:
                    raise
                # A service that tried its credential before `up` made the service user is
                # refused for a while; every seeding step finds what it made, so run again.
                wait = float(failed.metadata.get("retry_after_seconds", "5"))
                self.say(f"nubis-{service}: the service credential is throttled (logins "
                         f"failed while the lab started); trying again in {wait:g}s")
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())) + 0.5)


def seed_image(ctx: PostStartContext) -> None:
    """Register the lab image, public, unless an ACTIVE one of that name exists."""
    seeder = Seeder(ctx)
    path = make_image(ctx.plan.data_dir / "seed" / IMAGE_FILE)
    upload = Upload(path, path.stat().st_size, image_cli.sha256_of(path))
    found = seeder.run("storage", image_stream.storage_stub, lambda s: _ensure_image(s, upload))
    if found is not None:
        seeder.say(f"image {IMAGE_NAME}: {found.meta.id} (boots and prints to its console)")


@dataclass(frozen=True)
class Upload:
    """The file to upload, its size and sha256, read before any call is made."""

    path: Path
    size: int
    sha256: str


async def _ensure_image(s: StorageStub, upload: Upload) -> image_pb2.Image:
    reply = await s.ListImages(image_pb2.ListImagesRequest(filter=f"name={IMAGE_NAME}"))
    image = next(iter(reply.images), None)
    if image is not None and image.state == image_pb2.Image.ACTIVE:
        return image
    if image is None or image.state not in (image_pb2.Image.QUEUED, image_pb2.Image.ERROR):
        # None yet, or one a dead upload left behind (SAVING, DELETED): start afresh.
        image = await s.CreateImage(image_pb2.CreateImageRequest(image=image_pb2.Image(
            meta=resource_pb2.ResourceMeta(
                name=IMAGE_NAME, description="Made by `nubis lab up`: a boot sector that "
                "prints 'nubis lab guest: booted' on the serial console and halts."),
            disk_format=image_pb2.Image.DISK_FORMAT_QCOW2, min_disk_gb=1,
            visibility=image_pb2.Image.VISIBILITY_PUBLIC,
            properties={"os_distro": "none", "hw_disk_bus": "virtio"})))
    uploaded: image_pb2.Image = await s.UploadImage(image_cli.upload_requests(
        image.meta.id, upload.path, upload.size, upload.sha256, lambda _: None))
    return uploaded


def seed_networks(ctx: PostStartContext) -> None:
    """The admin project's private network and subnet, the external public network, and
    `router1` from one to the other (SNAT) on the lab's network node."""
    seeder = Seeder(ctx)
    # With agents, the first is the network node: wait a while for it to be UP.
    node_wait = NODE_WAIT if ctx.plan.nodes else 0.0
    made = seeder.run("network", network_service_pb2_grpc.NetworkServiceStub,
                      lambda s: _ensure_networks(s, node_wait))
    if made is not None:
        for line in made:
            seeder.say(line)


async def _ensure_networks(s: NetworkStub, node_wait: float) -> list[str]:
    private = await _ensure_network(s, network_pb2.Network(
        meta=resource_pb2.ResourceMeta(name=PRIVATE_NETWORK,
                                       description="The admin project's network (lab)."),
        admin_state_up=True))
    private_subnet = await _ensure_subnet(s, subnet_pb2.Subnet(
        meta=resource_pb2.ResourceMeta(name=PRIVATE_SUBNET), network_id=private.meta.id,
        cidr=PRIVATE_CIDR, dhcp_enabled=True))
    public = await _ensure_network(s, network_pb2.Network(
        meta=resource_pb2.ResourceMeta(name=PUBLIC_NETWORK,
                                       description="External and shared: floating IPs, "
                                       "router gateways, and any project's ports (lab)."),
        # Shared too, so a newcomer's own project can boot onto it before making a network.
        external=True, shared=True, admin_state_up=True))
    public_subnet = await _ensure_subnet(s, subnet_pb2.Subnet(
        meta=resource_pb2.ResourceMeta(name=PUBLIC_SUBNET), network_id=public.meta.id,
        cidr=PUBLIC_CIDR, dhcp_enabled=True,
        allocation_pools=[subnet_pb2.AllocationPool(start=PUBLIC_POOL[0], end=PUBLIC_POOL[1])]))
    said = [f"network {PRIVATE_NETWORK}: {private.meta.id} "
            f"(subnet {private_subnet.cidr}, {private_subnet.meta.id})",
            f"network {PUBLIC_NETWORK} (external, shared): {public.meta.id} "
            f"(subnet {public_subnet.cidr}, {public_subnet.meta.id})"]
    deadline = time.monotonic() + node_wait
    while True:
        try:
            router = await _ensure_router(s, private_subnet.meta.id, public.meta.id)
            break
        except grpc.aio.AioRpcError as exc:
            if rpc_errors.error_reason(exc) != NO_NETWORK_NODE:
                raise
            # The agents have just started: their nodes reach the scheduler within seconds.
            # A lab without agents has none to wait for; the rest still stands.
            if time.monotonic() > deadline:
                return [*said, f"router {ROUTER}: not made, no network node is up (start "
                        "the lab with --nodes 1 or more)"]
            await asyncio.sleep(0.5)
    return [*said, f"router {ROUTER}: {router.meta.id} ({PRIVATE_NETWORK} -> "
                   f"{PUBLIC_NETWORK}, SNAT)"]


async def _ensure_router(s: NetworkStub, subnet_id: str, external_id: str) -> router_pb2.Router:
    """The router joining the private subnet to the external network, as far as it is."""
    reply = await s.ListRouters(router_pb2.ListRoutersRequest(filter=f"name={ROUTER}"))
    router = next(iter(reply.routers), None)
    if router is None:
        router = await s.CreateRouter(router_pb2.CreateRouterRequest(router=router_pb2.Router(
            meta=resource_pb2.ResourceMeta(name=ROUTER, description="The lab's router: "
                                           f"{PRIVATE_NETWORK} out through {PUBLIC_NETWORK}."),
            admin_state_up=True,
            external_gateway=router_pb2.ExternalGateway(network_id=external_id,
                                                        enable_snat=True))))
    if subnet_id not in {interface.subnet_id for interface in router.interfaces}:
        router = await s.AddRouterInterface(router_pb2.AddRouterInterfaceRequest(
            router_id=router.meta.id, subnet_id=subnet_id))
    done: router_pb2.Router = router
    return done


async def _ensure_network(s: NetworkStub, wanted: network_pb2.Network) -> network_pb2.Network:
    reply = await s.ListNetworks(network_pb2.ListNetworksRequest(
        filter=f"name={wanted.meta.name}"))
    # The List shows the project's own networks and every shared or external one: a
    # private network that is neither is the project's own.
    ours = [n for n in reply.networks
            if (n.external, n.shared) == (wanted.external, wanted.shared)]
    if ours:
        return ours[0]
    created: network_pb2.Network = await s.CreateNetwork(
        network_pb2.CreateNetworkRequest(network=wanted))
    return created


async def _ensure_subnet(s: NetworkStub, wanted: subnet_pb2.Subnet) -> subnet_pb2.Subnet:
    reply = await s.ListSubnets(subnet_pb2.ListSubnetsRequest(
        filter=f"network_id={wanted.network_id} name={wanted.meta.name}"))
    if reply.subnets:
        return reply.subnets[0]
    created: subnet_pb2.Subnet = await s.CreateSubnet(
        subnet_pb2.CreateSubnetRequest(subnet=wanted))
    return created


def seed_flavors(ctx: PostStartContext) -> None:
    """Name the flavors a server can boot with (compute writes its defaults at start)."""
    seeder = Seeder(ctx)
    found = seeder.run("compute", compute_service_pb2_grpc.ComputeServiceStub, _flavors)
    if found is None:
        return
    if not found:
        seeder.say("flavors: none yet (nubis flavor create NAME --vcpus N --ram MIB --disk GIB)")
        return
    seeder.say("flavors: " + ", ".join(
        f"{f.meta.name} ({f.vcpus} vCPU, {f.ram_mb} MiB, {f.disk_gb} GiB)" for f in found))


async def _flavors(s: ComputeStub) -> list[flavor_pb2.Flavor]:
    reply = await s.ListFlavors(flavor_pb2.ListFlavorsRequest(page_size=1000))
    return sorted(reply.flavors, key=lambda f: (f.vcpus, f.ram_mb, f.meta.name))
