"""A volume plugged live into real guests: what one guest wrote on it, the other finds.

Two nubis guests boot once for the module on a QEMU node (qemu_harness.py). A
volume of the node's pool is attached through AttachVolume to running guest A:
the guest sees a new virtio disk and writes its marker there (hostname and a
fresh id, deploy/guest/disk-check), saying so on its console, read through
GetConsoleLog. DetachVolume takes the disk out of A's running domain, as the
node's libvirt itself reports it; AttachVolume to guest B then makes B find
A's hostname and the same id: the data outlived the detach and moved with the
volume. Runs as root where libvirtd and QEMU are installed and the guest can
be built; skips otherwise. Plugged back into A under the name it had, the
disk is checked again (the guest forgets a disk unplugged) and A finds its own
mark.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator
from dataclasses import dataclass

import libvirt
import pytest
from nubis.compute.v1 import instance_verbs_pb2 as V

from services.client.lab import guest_image
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import libvirtd
from tests.functional.compute import harness, qemu_harness
from tests.functional.compute.test_hotplug import idle, volume_on
from tests.functional.compute.test_real_guests import guest
from tests.functional.network import netns

__all__ = ["guest"]

pytestmark = [
    pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(180),
    pytest.mark.skipif(libvirtd.missing_reason() is not None,
                       reason=libvirtd.missing_reason() or ""),
    pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or ""),
]
Instance = qemu_harness.Instance
DISK_LINE = r"NUBIS-GUEST-DISK (vd[b-z]) {verb} (\S+) (\S+)"
"""A plugged disk's line: device, the hostname that wrote the marker, its id."""


@dataclass
class Guests:
    """The cloud, its QEMU node and the two running guests."""

    cloud: harness.ComputeCloud
    node: qemu_harness.QemuNode
    a: Instance
    b: Instance


@pytest.fixture(scope="module")
async def guests(etcd: EtcdEndpoint, redis: RedisEndpoint,
                 tmp_path_factory: pytest.TempPathFactory,
                 guest: guest_image.GuestImage) -> AsyncIterator[Guests]:
    tmp_path = tmp_path_factory.mktemp("guest-volumes")
    cloud = await harness.build(etcd, redis, tmp_path)
    try:
        async with qemu_harness.qemu_node(cloud, tmp_path, guest) as node:
            made = [await cloud.create(node.server(name)) for name in ("guest-a", "guest-b")]
            servers = [await cloud.wait_final(m.meta.id, within=90) for m in made]
            assert [s.state for s in servers] == [Instance.ACTIVE] * 2, [
                s.fault for s in servers]
            for server in servers:
                # Once a lease is applied the guest has its hostname (DHCP's).
                await node.console_shows(server.meta.id, "NUBIS-GUEST-IP eth0 ", within=90)
            yield Guests(cloud, node, servers[0], servers[1])
    finally:
        await cloud.close()


def live_disks(node: qemu_harness.QemuNode, instance_id: str) -> dict[str, str]:
    """Target device -> source file of the running domain's disks, as libvirt reports them
    (what `virsh domblklist` shows), asked of the node's libvirtd itself."""
    conn = libvirt.open(node.uri)
    try:
        xml = conn.lookupByName(f"instance-{instance_id}").XMLDesc(0)
    finally:
        conn.close()
    disks = {}
    for disk in ElementTree.fromstring(xml).iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None:
            disks[target.get("dev", "")] = "" if source is None else source.get("file", "")
    return disks


async def says(node: qemu_harness.QemuNode, server: Instance, pattern: str) -> re.Match[str]:
    """The first match of `pattern` in the server's console (its whole log when it never
    comes)."""
    try:
        return await node.console_shows(server.meta.id, pattern, within=60)
    except TimeoutError:
        pytest.fail(f"{pattern!r} not on {server.meta.name}'s console:\n"
                    f"{await node.console(server.meta.id)}")


async def plugged(on: Guests, server: Instance, volume_id: str) -> Instance:
    await on.cloud.stub().AttachVolume(V.AttachVolumeRequest(
        instance_id=server.meta.id, volume_id=volume_id), metadata=on.cloud.admin)
    found = await idle(on.cloud, server)
    assert found.state == Instance.ACTIVE and not found.fault.message, found.fault.message
    assert volume_id in [v.volume_id for v in found.volumes]
    return found


async def unplugged(on: Guests, server: Instance, volume_id: str) -> None:
    await on.cloud.stub().DetachVolume(V.DetachVolumeRequest(
        instance_id=server.meta.id, volume_id=volume_id), metadata=on.cloud.admin)
    left = await idle(on.cloud, server)
    assert not left.fault.message, left.fault.message
    assert volume_id not in [v.volume_id for v in left.volumes]


async def test_a_volume_written_by_one_guest_is_found_by_the_other_after_a_live_move(
        guests: Guests) -> None:
    cloud, node, a, b = guests.cloud, guests.node, guests.a, guests.b
    volume_id = await volume_on(cloud, node.name)

    found = await plugged(guests, a, volume_id)
    device = next(v.device_name for v in found.volumes if v.volume_id == volume_id)
    assert device in live_disks(node, a.meta.id)
    wrote = await says(node, a, DISK_LINE.format(verb="wrote"))
    assert wrote.group(1) == device
    host, mark = wrote.group(2), wrote.group(3)
    assert host.startswith(a.meta.name), host

    await unplugged(guests, a, volume_id)
    disks = live_disks(node, a.meta.id)
    assert device not in disks and not [f for f in disks.values() if volume_id in f], disks

    await plugged(guests, b, volume_id)
    moved = await says(node, b, DISK_LINE.format(verb="found"))
    assert (moved.group(2), moved.group(3)) == (host, mark)

    # Back to A, under the device name it had: A checks it again and finds its own mark.
    await unplugged(guests, b, volume_id)
    back = await plugged(guests, a, volume_id)
    assert next(v.device_name for v in back.volumes if v.volume_id == volume_id) == device
    again = await says(node, a, DISK_LINE.format(verb="found"))
    assert (again.group(1), again.group(2), again.group(3)) == (device, host, mark)

