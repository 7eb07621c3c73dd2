"""Two real guests on one tenant network: what their ports' filters and a router let through.

A compute cloud (harness.py) gains a QEMU node (qemu_harness.py) that is also a
network node, so a router's namespace lands beside the guests' bridges. Two
nubis guests are booted once for the module through CreateInstance, in one
security group allowing ICMP and HTTP. A guest cannot be given commands on its
console, so the tests ask it over HTTP (its busybox httpd's CGI scripts, see
deploy/guest/), from the network's DHCP namespace on the node: guest B pings
guest A as long as A's group allows ICMP; B cannot send from an address or a
MAC nubis did not give it, nor claim A's address over ARP (the port's filter
drops them; without port security the same requests get through); and from a
namespace on an external network, A's page is reached at its floating IP until
the floating IP is disassociated.
Runs as root where libvirtd and QEMU are installed and the guest can be built;
skips otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    network_pb2,
    port_pb2,
    router_pb2,
    security_group_pb2,
    subnet_pb2,
)

from services.client.lab import guest_image
from services.common import network_devices
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import libvirtd
from tests.functional.compute import harness, qemu_harness
from tests.functional.compute.harness import ComputeCloud
from tests.functional.network import netns

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(180),
    pytest.mark.skipif(libvirtd.missing_reason() is not None,
                       reason=libvirtd.missing_reason() or ""),
    pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or ""),
]
Instance = qemu_harness.Instance
Rule = security_group_pb2.SecurityGroupRule
SecurityGroup = security_group_pb2.SecurityGroup
R, F = router_pb2, floating_ip_pb2
EXTERNAL_CIDR = "203.0.113.0/24"
UPSTREAM = "203.0.113.1"
"""The external subnet's gateway: the address of the test's namespace on that network."""
CHANGE_TIMEOUT = 90.0
"""Seconds for a call that changes what a running guest's port lets through: it returns
once the node has loaded the port's new filter (with `agent.port_filter: nwfilter`,
libvirt re-applies it to the running guest: seconds on a loaded machine, beyond the
default deadline)."""

_GET = """
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as reply:
        print(reply.read().decode().strip())
except OSError as exc:
    print(f"unreachable: {exc}")
"""


def http_get(namespace: str, url: str, timeout: float = 8.0) -> str:
    """The body of GET `url` sent from inside `namespace` ("unreachable: ..." if none came)."""
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", _GET, url,
                           str(timeout)], capture_output=True, text=True, timeout=timeout + 20,
                          check=False)
    return done.stdout.strip() or f"unreachable: {done.stderr.strip()[-200:]}"


@dataclass
class Guests:
    """The cloud, its QEMU node, the two guests (A, B) and their security group."""

    cloud: ComputeCloud
    node: qemu_harness.QemuNode
    servers: list[Instance]
    group_id: str
    icmp_rule_id: str

    @property
    def addresses(self) -> list[str]:
        return [server.addresses[0].ip_address for server in self.servers]

    @property
    def tenant_namespace(self) -> str:
        """The network's DHCP namespace on the node: a host on the guests' bridge."""
        return network_devices.dhcp_namespace(self.node.network_id, self.node.namespace)

    async def ask(self, address: str, query: str) -> str:
        """What the guest at `address` answers to /cgi-bin/`query`."""
        return await asyncio.to_thread(http_get, self.tenant_namespace,
                                       f"http://{address}/cgi-bin/{query}")

    async def page(self, address: str) -> str:
        """The page the guest at `address` serves ("nubis guest <its hostname>")."""
        return await asyncio.to_thread(http_get, self.tenant_namespace, f"http://{address}/")


async def _eventually(fetch: Callable[[], Awaitable[str]], wanted: Callable[[str], bool],
                      what: str, within: float = 45.0) -> str:
    """The first answer of `fetch` that is `wanted` (AssertionError with the last ones if
    none is within `within` seconds)."""
    seen: list[str] = []
    try:
        async with asyncio.timeout(within):
            while True:
                seen.append(await fetch())
                if wanted(seen[-1]):
                    return seen[-1]
                await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(f"{what}: {seen[-3:]}") from None


async def _answers(guests: Guests, address: str, query: str, wanted: str,
                   within: float = 45.0) -> None:
    """Until the guest at `address` answers `wanted` to `query`."""
    await _eventually(lambda: guests.ask(address, query), lambda seen: seen == wanted,
                      f"{query} on {address} never answered {wanted!r}", within)


async def _ingress_rule(cloud: ComputeCloud, group_id: str, protocol: str, port: int = 0) -> str:
    rule = await cloud.network_stub().CreateSecurityGroupRule(
        security_group_pb2.CreateSecurityGroupRuleRequest(security_group_rule=Rule(
            security_group_id=group_id, direction=Rule.DIRECTION_INGRESS,
            ether_type=Rule.ETHER_TYPE_IPV4, protocol=protocol, port_range_min=port,
            port_range_max=port, remote_ip_prefix="0.0.0.0/0")),
        metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
    return str(rule.meta.id)


async def _boot(cloud: ComputeCloud, node: qemu_harness.QemuNode) -> Guests:
    group = await cloud.network_stub().CreateSecurityGroup(
        security_group_pb2.CreateSecurityGroupRequest(security_group=SecurityGroup(
            meta=resource_pb2.ResourceMeta(name="web"))), metadata=cloud.admin)
    icmp = await _ingress_rule(cloud, group.meta.id, "icmp")
    await _ingress_rule(cloud, group.meta.id, "tcp", 80)
    made = []
    for name in ("guest-a", "guest-b"):
        server = node.server(name)
        server.security_groups.append(group.meta.id)
        made.append(await cloud.create(server))
    servers = [await cloud.wait_final(m.meta.id, within=90) for m in made]
    assert [s.state for s in servers] == [Instance.ACTIVE] * 2, [s.fault for s in servers]
    guests = Guests(cloud, node, servers, group.meta.id, icmp)
    for server, address in zip(servers, guests.addresses, strict=True):
        await node.console_shows(server.meta.id, rf"NUBIS-GUEST-IP eth0 {address}/", within=90)
    a, b = guests.addresses
    await _answers(guests, b, f"ping?target={a}", "ok", within=60)
    return guests


@pytest.fixture(scope="module")
def guest(request: pytest.FixtureRequest) -> guest_image.GuestImage:
    """Built once per cache dir (kept between runs while the packages and scripts hold)."""
    try:
        return guest_image.build_guest(Path(request.config.cache.mkdir("nubis-guest")))
    except guest_image.GuestBuildError as exc:
        pytest.skip(f"the nubis guest cannot be built here: {exc}")


@pytest.fixture(scope="module")
async def guests(etcd: EtcdEndpoint, redis: RedisEndpoint,
                 tmp_path_factory: pytest.TempPathFactory,
                 guest: guest_image.GuestImage) -> AsyncIterator[Guests]:
    """The two guests, booted once for the module; the node and the cloud go after."""
    tmp_path = tmp_path_factory.mktemp("guest-network")
    cloud = await harness.build(etcd, redis, tmp_path)
    try:
        async with qemu_harness.qemu_node(cloud, tmp_path, guest, network_node=True) as node:
            yield await _boot(cloud, node)
    finally:
        await cloud.close()


async def test_a_guest_pings_its_neighbour_as_long_as_the_neighbours_group_allows_icmp(
        guests: Guests) -> None:
    cloud = guests.cloud
    a, b = guests.addresses
    assert await guests.ask(b, f"ping?target={a}") == "ok"
    assert await guests.ask(b, "ping?target=1;reboot") == "bad"

    await cloud.network_stub().DeleteSecurityGroupRule(
        security_group_pb2.DeleteSecurityGroupRuleRequest(id=guests.icmp_rule_id),
        metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
    try:
        await _answers(guests, b, f"ping?target={a}", "fail")
        assert await guests.ask(b, f"ping?target={a}") == "fail"
        # Only ICMP is refused: A still serves its page (TCP 80 is allowed).
        assert (await guests.page(a)).startswith("nubis guest guest-a")
    finally:
        guests.icmp_rule_id = await _ingress_rule(cloud, guests.group_id, "icmp")
    await _answers(guests, b, f"ping?target={a}", "ok")


async def _free_address(guests: Guests) -> str:
    """An address of the guests' subnet that no port holds."""
    ports = await guests.cloud.network_stub().ListPorts(
        port_pb2.ListPortsRequest(page_size=1000, all_projects=True), metadata=guests.cloud.admin)
    held = {fixed.ip_address for found in ports.ports for fixed in found.fixed_ips}
    hosts = list(ipaddress.ip_network(qemu_harness.CIDR).hosts())
    return next(str(host) for host in reversed(hosts) if str(host) not in held)


async def _port_security(guests: Guests, port_id: str, enabled: bool) -> None:
    """Port security on (with the guests' group) or off (no group) for `port_id`."""
    groups = [guests.group_id] if enabled else []
    await guests.cloud.network_stub().UpdatePort(port_pb2.UpdatePortRequest(
        port=port_pb2.Port(meta=resource_pb2.ResourceMeta(id=port_id),
                           port_security_enabled=enabled, security_group_ids=groups),
        update_mask=field_mask_pb2.FieldMask(paths=["port_security_enabled",
                                                    "security_group_ids"])),
        metadata=guests.cloud.admin, timeout=CHANGE_TIMEOUT)


async def _only_port_security_stops(guests: Guests, forged_query: str) -> None:
    """B's `forged_query` fails; with B's port security off it gets through ("ok"), so
    what stopped it was B's port filter; once port security is back it fails again."""
    b = guests.addresses[1]
    port_b = guests.servers[1].port_ids[0]
    assert await guests.ask(b, forged_query) == "fail"
    await _port_security(guests, port_b, enabled=False)
    try:
        await _answers(guests, b, forged_query, "ok")
    finally:
        await _port_security(guests, port_b, enabled=True)
    await _answers(guests, b, forged_query, "fail")


async def test_a_guest_cannot_send_from_an_address_nubis_did_not_give_it(
        guests: Guests) -> None:
    a, b = guests.addresses
    forged = await _free_address(guests)
    assert await guests.ask(b, f"ping-from?target={a}&source={b}") == "ok"

    await _only_port_security_stops(guests, f"ping-from?target={a}&source={forged}")

    assert await guests.ask(b, f"ping-from?target={a}&source={b}") == "ok"


async def test_a_guest_cannot_send_from_a_mac_nubis_did_not_give_it(guests: Guests) -> None:
    a, b = guests.addresses
    own = guests.servers[1].addresses[0].mac_address.lower()
    ports = await guests.cloud.network_stub().ListPorts(
        port_pb2.ListPortsRequest(page_size=1000, all_projects=True), metadata=guests.cloud.admin)
    forged = "fa:16:3e:5e:00:01"
    assert forged not in {found.mac_address.lower() for found in ports.ports}
    assert await guests.ask(b, f"mac-ping?target={a}&mac={own}") == "ok"

    await _only_port_security_stops(guests, f"mac-ping?target={a}&mac={forged}")

    # A may still send to the forged MAC until it asks for B's again.
    await _answers(guests, b, f"mac-ping?target={a}&mac={own}", "ok")


def _neighbour_mac(guests: Guests, address: str) -> str:
    """The MAC the tenant namespace's ARP cache holds for `address` ("" if none)."""
    shown = netns.run("ip", "-n", guests.tenant_namespace, "neigh", "show", "to", address).stdout
    words = shown.split()
    return words[words.index("lladdr") + 1].lower() if "lladdr" in words else ""


async def _after_claim(guests: Guests) -> str:
    """The MAC the tenant namespace holds for A's address once B claimed it over ARP (the
    cache is given A's own entry first: ARP only overrides an entry it finds)."""
    a, b = guests.addresses
    assert (await guests.page(a)).startswith("nubis guest guest-a")
    assert await guests.ask(b, f"arp-claim?address={a}") == "sent"
    return await asyncio.to_thread(_neighbour_mac, guests, a)


async def test_a_guest_cannot_claim_its_neighbours_address_over_arp(guests: Guests) -> None:
    a, b = guests.addresses
    mac_a, mac_b = (server.addresses[0].mac_address.lower() for server in guests.servers)
    assert await _after_claim(guests) == mac_a
    assert await _after_claim(guests) == mac_a

    # What stops it is B's port filter: without port security the claim takes A's entry.
    port_b = guests.servers[1].port_ids[0]
    await _port_security(guests, port_b, enabled=False)
    try:
        await _eventually(lambda: _after_claim(guests), lambda seen: seen == mac_b,
                          f"B's claim to {a} never got through without port security")
    finally:
        await _port_security(guests, port_b, enabled=True)
        netns.run("ip", "-n", guests.tenant_namespace, "neigh", "flush", "to", a)
    # Once B's filter is back (a forged source fails again), the claim is dropped again.
    forged = await _free_address(guests)
    await _answers(guests, b, f"ping-from?target={a}&source={forged}", "fail")
    assert await _after_claim(guests) == mac_a


async def _external_network(cloud: ComputeCloud) -> str:
    stub = cloud.network_stub()
    public = await stub.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name="public"),
                                    external=True)), metadata=cloud.admin)
    await stub.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        network_id=public.meta.id, cidr=EXTERNAL_CIDR, gateway_ip=UPSTREAM)),
        metadata=cloud.admin)
    return str(public.meta.id)


async def _router(guests: Guests, external_id: str) -> R.Router:
    """A router on the node: its gateway on `external_id`, an interface on the guests' subnet."""
    stub, admin = guests.cloud.network_stub(), guests.cloud.admin
    made = await stub.CreateRouter(R.CreateRouterRequest(router=R.Router(
        meta=resource_pb2.ResourceMeta(name="edge"),
        external_gateway=R.ExternalGateway(network_id=external_id))),
        metadata=admin, timeout=CHANGE_TIMEOUT)
    await stub.AddRouterInterface(R.AddRouterInterfaceRequest(
        router_id=made.meta.id, subnet_id=guests.node.subnet_id),
        metadata=admin, timeout=CHANGE_TIMEOUT)
    router = await stub.GetRouter(R.GetRouterRequest(id=made.meta.id), metadata=admin)
    assert router.state == R.Router.ACTIVE, router.fault
    assert router.node == guests.node.name
    return router


async def test_a_floating_ip_reaches_its_guest_from_outside_until_it_is_disassociated(
        guests: Guests, tmp_path: Path) -> None:
    cloud, node = guests.cloud, guests.node
    stub = cloud.network_stub()
    external_id = await _external_network(cloud)
    router = await _router(guests, external_id)
    spaces = netns.Namespaces(tmp_path)
    try:
        outside = spaces.attach_guest(node.namespace, network_devices.bridge(external_id),
                                      "outside", "fa:16:3e:7f:00:01")
        netns.run("ip", "-n", outside, "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
        fip = await stub.CreateFloatingIp(F.CreateFloatingIpRequest(
            floating_ip=F.FloatingIp(floating_network_id=external_id),
            port_id=guests.servers[0].port_ids[0]), metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
        assert fip.state == F.FloatingIp.ACTIVE, fip.fault
        url = f"http://{fip.floating_ip_address}/"

        def get() -> Awaitable[str]:
            return asyncio.to_thread(http_get, outside, url, 4)

        page = await _eventually(get, lambda seen: not seen.startswith("unreachable"),
                                 f"{url} never answered from outside", within=30)
        assert page.startswith("nubis guest guest-a")
        assert page == await guests.page(guests.addresses[0])

        await stub.DisassociateFloatingIp(F.DisassociateFloatingIpRequest(id=fip.meta.id),
                                          metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
        await _eventually(get, lambda seen: seen.startswith("unreachable"),
                          f"{url} still answers once disassociated", within=30)
        assert (await get()).startswith("unreachable")
        await stub.DeleteFloatingIp(F.DeleteFloatingIpRequest(id=fip.meta.id),
                                    metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
        await stub.RemoveRouterInterface(R.RemoveRouterInterfaceRequest(
            router_id=router.meta.id, subnet_id=node.subnet_id),
            metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
        await stub.DeleteRouter(R.DeleteRouterRequest(id=router.meta.id),
                                metadata=cloud.admin, timeout=CHANGE_TIMEOUT)
        namespace = network_devices.router_namespace(router.meta.id, node.namespace)
        assert namespace not in netns.run("ip", "netns", "list").stdout
    finally:
        spaces.remove_all()
