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

import time
from pathlib import Path

import pytest

from services.client.lab import guest_image
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
