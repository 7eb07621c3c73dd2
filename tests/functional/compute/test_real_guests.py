"""Real guests booted through the whole nubis stack: CreateInstance to a QEMU console.

The compute cloud (harness.py) gains a QEMU node (qemu_harness.py): a private
libvirtd (TCG) and the kernel dataplane in a node namespace of the test's own.
The nubis guest, registered in the cloud's storage as the lab registers it, is
booted through CreateInstance onto that node; its console log, read through
GetConsoleLog, says it is up and the address DHCP gave it, which must be the
one nubis assigned its port. Runs as root where libvirtd and QEMU are
installed and the guest can be built; skips otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import security_group_pb2

from services.client.lab import guest_image
from services.common import network_devices
from tests.functional import libvirtd
from tests.functional.compute import qemu_harness
from tests.functional.compute.harness import ComputeCloud, cloud  # noqa: F401
from tests.functional.network import netns

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(180),
    pytest.mark.skipif(libvirtd.missing_reason() is not None,
                       reason=libvirtd.missing_reason() or ""),
    pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or ""),
]
Instance = qemu_harness.Instance
Rule = security_group_pb2.SecurityGroupRule
# A rule change returns once the node has loaded the filter of every running guest's
# port (with nwfilter, libvirt re-applies it: seconds per port on a loaded machine).
CHANGE_TIMEOUT = 90.0
SecurityGroup = security_group_pb2.SecurityGroup


@pytest.fixture(scope="session")
def guest(request: pytest.FixtureRequest) -> guest_image.GuestImage:
    """Built once per cache dir (kept between runs while the package versions hold)."""
    try:
        return guest_image.build_guest(Path(request.config.cache.mkdir("nubis-guest")))
    except guest_image.GuestBuildError as exc:
        pytest.skip(f"the nubis guest cannot be built here: {exc}")


async def test_a_guest_created_through_compute_boots_and_says_the_address_nubis_gave_it(
        cloud: ComputeCloud, tmp_path: Path, guest: guest_image.GuestImage) -> None:  # noqa: F811
    async with qemu_harness.qemu_node(cloud, tmp_path, guest) as node:
        asked = time.monotonic()
        made = await cloud.create(node.server("guest-a"))
        server = await cloud.wait_final(made.meta.id, within=60)
        assert server.state == Instance.ACTIVE, server.fault
        assert server.node == node.name
        addresses = [a.ip_address for a in server.addresses]
        assert len(addresses) == 1
        await node.console_shows(server.meta.id, rf"{qemu_harness.UP_MARKER} \S+")
        said = await node.console_shows(server.meta.id, r"NUBIS-GUEST-IP eth0 (\S+)/(\d+)")
        booted = time.monotonic() - asked
        assert said.group(1) == addresses[0]
        assert said.group(2) == "24"
        print(f"create -> boot marker and address: {booted:.1f} s")


async def _icmp_rule(on: ComputeCloud, group_id: str) -> str:
    rule = await on.network_stub().CreateSecurityGroupRule(
        security_group_pb2.CreateSecurityGroupRuleRequest(security_group_rule=Rule(
            security_group_id=group_id, direction=Rule.DIRECTION_INGRESS,
            ether_type=Rule.ETHER_TYPE_IPV4, protocol="icmp", remote_ip_prefix="0.0.0.0/0")),
        metadata=on.admin, timeout=CHANGE_TIMEOUT)
    return str(rule.meta.id)


async def _until(check: Callable[[], bool], within: float = 30.0) -> None:
    """Until `check` holds (it runs in a thread: a ping blocks)."""
    async with asyncio.timeout(within):
        while True:
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.5)


async def test_two_guests_answer_ping_as_their_group_says_and_delete_leaves_nothing(
        cloud: ComputeCloud, tmp_path: Path, guest: guest_image.GuestImage) -> None:  # noqa: F811
    """The guest cannot be told to ping, so each guest is pinged from the network's own
    address on the node (its DHCP namespace, on the guests' bridge)."""
    async with qemu_harness.qemu_node(cloud, tmp_path, guest) as node:
        group = await cloud.network_stub().CreateSecurityGroup(
            security_group_pb2.CreateSecurityGroupRequest(security_group=SecurityGroup(
                meta=resource_pb2.ResourceMeta(name="pingable"))), metadata=cloud.admin)
        rule_id = await _icmp_rule(cloud, group.meta.id)
        made = []
        for name in ("guest-a", "guest-b"):
            server = node.server(name)
            server.security_groups.append(group.meta.id)
            made.append(await cloud.create(server))
        servers = [await cloud.wait_final(m.meta.id, within=60) for m in made]
        assert [s.state for s in servers] == [Instance.ACTIVE] * 2, [s.fault for s in servers]
        addresses = [s.addresses[0].ip_address for s in servers]
        for server, address in zip(servers, addresses, strict=True):
            await node.console_shows(server.meta.id, rf"NUBIS-GUEST-IP eth0 {address}/")
        await _until(lambda: all(node.ping_from_dhcp(a) for a in addresses))

        await cloud.network_stub().DeleteSecurityGroupRule(
            security_group_pb2.DeleteSecurityGroupRuleRequest(id=rule_id), metadata=cloud.admin,
            timeout=CHANGE_TIMEOUT)
        await _until(lambda: not any(node.ping_from_dhcp(a) for a in addresses))
        await _icmp_rule(cloud, group.meta.id)
        await _until(lambda: all(node.ping_from_dhcp(a) for a in addresses))
        # Each port's filter is its nftables chains on the node, loaded before the guest ran.
        filters = node.port_filters()
        assert all(f"port-{s.port_ids[0]}-in" in filters for s in servers), filters

        for server in servers:
            await cloud.delete(server.meta.id)
        for server in servers:
            await cloud.wait_gone(server.meta.id)
        left = node.domains()
        assert not [s for s in servers if f"instance-{s.meta.id}" in left], left
        disks = [s.root_volume_id for s in servers]
        assert all(disks) and not [p for p in node.pool_path.iterdir()
                                   if any(d in p.name for d in disks)]
        links, hosts, filters = node.links(), node.dhcp_hosts(), node.port_filters()
        for server in servers:
            assert network_devices.tap(server.port_ids[0]) not in links
            assert server.port_ids[0] not in filters
            assert server.addresses[0].mac_address.lower() not in hosts.lower()
            assert server.addresses[0].ip_address not in hosts
