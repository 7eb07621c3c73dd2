"""Guest benchmark: real guests under QEMU, from CreateInstance to the guest's boot marker.

Starts a qemu lab (`services/client/lab`, one node under the lab's own libvirtd,
TCG where KVM is not usable; the nubis guest registered), lifts the admin
project's quota and makes a small flavor (1 vCPU, 192 MiB), then for each round
(by default 1 guest, 1 again, then 4 at once) boots the nubis guest on the private network and
splits each server's time in two:

- control plane: CreateInstance sent -> the domain started, i.e. the end of
  the `spawn` step of the instance's `create` action (compute's own timestamps;
  the server is ACTIVE then), with every step of the action (allocate_network,
  block_device_mapping, spawn) beside it, and create -> its first step
  (admission and scheduling);
- guest boot: the domain started -> `NUBIS-GUEST-UP` in its console log, read
  through GetConsoleLog every 0.1 s (and -> its DHCP address, NUBIS-GUEST-IP);

and the RSS of each guest's QEMU process (found by the domain's name on its
command line), then deletes the round's servers. The first round is the
node's first boot of the guest (its kernel and ramdisk fetched into the
node's image cache); in a later 1-guest round, before the delete (the guest
paused), libvirt's createXML of the same domain is timed alone 3 times: bare
(no disks, NICs or serial file: QEMU's start) and with its NICs (the same
bridge; tap name, MAC and PCI address left to libvirt), and "nubis's own
share" is the control plane less the latter. Prints each round's table;
exits 1 if a guest did not say its address within `--wait` seconds. Goal:
control plane < 1 s. Needs root, libvirtd and QEMU (as `nubis lab up
--driver qemu`); NUBIS_LOG_LEVEL (default warning) sets the lab's log level.
Usage: ``sudo python bench/guest_bench.py [--rounds 1,1,4] [--wait 180] [--state-dir D]``.

Measured on a shared 2-core machine under TCG, with libvirt nwfilters as the
port filters (load 5-7: other test runs): 1 guest: control plane 11.6 s ->
2.8 s -> 1.75 s (the first spawn on a fresh libvirtd paid 8 s for libvirt
probing QEMU's capabilities; the agent now reads them at start), of which
spawn 1.4 s; libvirt's createXML of the same domain alone: bare 0.19 s, with
its NIC 1.3 s: the nwfilter's instantiation (one ebtables or iptables process
per rule) took ~1 s of every start. 4 at once: control plane median 6.3 s (the
filter setups queue in libvirt).

Then with the port filters in nftables, loaded by the agent when the port is
bound (before the domain starts), three runs while other
benchmarks ran on the machine (load 1.4-5): libvirt's createXML with the NIC
0.37-0.51 s, the same as bare (0.30-0.48 s): the NIC costs nothing at start
any more. 1 guest, warm image cache: control plane 0.75 and 0.90 s (spawn
0.53-0.74 s, allocate_network 0.12-0.17 s, block_device_mapping 0.02 s),
nubis's own share 0.39-0.48 s; the node's first boot of the image (cold
cache) 1.03-1.34 s. Guest boot to NUBIS-GUEST-UP 3.2-5.1 s. 4 at once: control
plane median 1.63-1.67 s (max 1.8-2.5 s): four QEMU starts share two cores
with the guests already booting under TCG (four createXML at once take 0.75 s
together on an idle libvirtd, against 0.39 s for one). QEMU RSS 234-236 MiB
per guest (192 MiB flavor; the guest lives in RAM).

Then four changes. (1) A cached image is used without the image fetch's lock:
three of four spawns waited 160-190 ms in `placement` for it (the agent's
"domain started" log line now says where a spawn's time went: placement,
define, start). (2) libvirtd runs under the lab's subreaper: a destroyed
guest's QEMU stayed a zombie until the machine's PID 1 reaped it, about 1.1 s
here, and libvirt's destroy waited for that: a destroy took 1.6 s, now 0.2 s
(deletes 0.4-2.1 -> 7.2-7.6 servers/s). (3) A TCG guest's vCPU threads run at
the idle scheduling class (agent.tcg_vcpu_scheduler, set by the qemu lab).
libvirt's start of a guest spends half its time in ~800 QMP round trips
checking the guest CPU (qom-get of every feature), each waiting behind the
vCPU threads of guests already booting; a start beside three booting guests,
12 pairs alternated (load 2.6-5.8): median 0.59 -> 0.51 s, mean 0.67 -> 0.56
s; this bench 4 at once, alternated at load 7-8: median 1.11-1.51 -> 0.77-1.26
s. (4) A deleted port's DHCP lease is released (see docs/architecture.md):
a guest given the address of an earlier round's guest got no lease for the
lease's whole day ("not using configured address ... leased to"), 3 rounds in
8 of `--rounds 1,4,4,4,4,4,4,4,4`. Two runs on a quiet machine (load 2.5-3,
the bench's own) after them: 1 guest, warm: control plane 0.38 s (spawn 0.27
s, allocate_network 0.08 s), libvirt's createXML of it alone 0.22 s, nubis's
own share 0.15-0.16 s; cold 0.64-0.69 s; guest boot 3.6-3.9 s. 4 at once, six
rounds: control plane median 0.78-0.88 s, max 0.82-0.97 s: the goal is met
(spawn 0.54-0.59 s, allocate_network 0.21-0.23 s); guest boot 8.1-8.7 s. While
a test suite ran beside (load 4-5): 0.82-1.18 s, max 0.89-1.59 s.

Then three more: spawn answers the domain it started instead of reading it
back (one of four such reads waited ~0.2 s on a libvirtd busy starting the
others), the first realization of a burst of binds waits 20 ms so the four
ports share one (their binds answered at 0.085 s and 0.17 s, now all at
0.14-0.16 s), and a cached image known to the agent is not looked up in
libvirt again (its six calls a volume took up to 0.26 s beside starting
guests; placement 0.1-2.6 ms now). Two runs of `--rounds 1,1,4,4,4,4` on a
quiet machine: 1 guest, warm: 0.34-0.36 s (nubis's own share 0.12-0.14 s);
cold 0.63-0.65 s. 4 at once, eight rounds: control plane median 0.73-0.79 s,
max 0.75-1.07 s (one round of eight over 1 s); allocate_network 0.17-0.22 s,
spawn 0.51-0.54 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    flavor_pb2,
    instance_action_pb2,
    instance_pb2,
    instance_requests_pb2,
    instance_verbs_pb2,
)
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.network.v1 import network_pb2, network_service_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compute_bench import World, delete_all

from services.client.lab import guest_image, qemu, runner, seed
from services.common import quota

Instance = instance_pb2.Instance
R = instance_requests_pb2
FLAVOR = "bench.guest"
GOAL_CONTROL_S = 1.0
UP = re.compile(r"NUBIS-GUEST-UP ")
ADDRESS = re.compile(r"NUBIS-GUEST-IP eth0 ")
CONSOLE_POLL = 0.1
RAW_STARTS = 3


@dataclass
class Guest:
    """One server of a round and what was seen of it (wall-clock seconds)."""

    name: str
    sent: float = 0.0
    server_id: str = ""
    started: float = 0.0
    """The end of the create action's spawn step: the domain runs."""
    up: float = 0.0
    address: float = 0.0
    rss_mib: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    domain_xml: str = ""
    """The running domain as libvirt defined it (for the raw start beside nubis's)."""


def start_lab(state_dir: Path) -> World:
    os.environ.setdefault("NUBIS_LOG_LEVEL", "warning")
    os.environ["NUBIS_LOG_JSON"] = "false"
    base = runner.find_free_base(start=29600)
    if base is None:
        raise RuntimeError("no free range of lab ports")
    plan = runner.make_plan(state_dir, nodes=1, base_port=base, driver=qemu.QEMU)
    said = io.StringIO()
    began = time.perf_counter()
    result = asyncio.run(runner.up(plan, Console(file=said), ready_timeout=180.0))
    print(f"qemu lab up in {time.perf_counter() - began:.1f}s", file=sys.stderr)
    print(said.getvalue(), file=sys.stderr)
    return World(plan, result.lab)


async def prepare(world: World) -> Instance:
    """The quota lifted, the bench flavor; the server shape (nubis guest, private)."""
    identity = identity_pb2_grpc.IdentityServiceStub(world.channel("identity"))
    admin = json.loads((world.plan.state_dir / "credentials.json").read_text())
    project = admin.get("project_id") or (await identity.ListProjects(
        identity_pb2.ListProjectsRequest(filter="name=admin"))).projects[0].meta.id
    await identity.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project,
                                 limits={r: quota.UNLIMITED for r in quota.RESOURCES}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits"])))
    compute = world.compute
    found = (await compute.ListFlavors(flavor_pb2.ListFlavorsRequest(
        filter=f"name={FLAVOR}"))).flavors
    flavor = found[0] if found else await compute.CreateFlavor(flavor_pb2.CreateFlavorRequest(
        flavor=flavor_pb2.Flavor(meta=resource_pb2.ResourceMeta(name=FLAVOR), vcpus=1,
                                 ram_mb=192, disk_gb=1, is_public=True)))
    storage = storage_service_pb2_grpc.StorageServiceStub(world.channel("storage"))
    images = (await storage.ListImages(image_pb2.ListImagesRequest(
        filter=f"name={guest_image.GUEST_NAME}"))).images
    if not images:
        raise RuntimeError("the lab could not build the nubis guest here")
    network = network_service_pb2_grpc.NetworkServiceStub(world.channel("network"))
    private = next(n for n in (await network.ListNetworks(network_pb2.ListNetworksRequest(
        filter=f"name={seed.PRIVATE_NETWORK}"))).networks if not n.shared)
    shape = Instance(flavor_id=flavor.meta.id, image_id=images[0].meta.id)
    shape.networks.add(network_id=private.meta.id)
    return shape


async def follow(world: World, guest: Guest, within: float) -> None:
    """Until the guest says its address (or `within` passes): its action's steps read
    until the domain runs, then its console polled; then its QEMU's RSS."""
    with contextlib.suppress(TimeoutError):
        await _follow(world, guest, within)
    guest.rss_mib = qemu_rss_mib(f"instance-{guest.server_id}")
    with contextlib.suppress(libvirt.libvirtError):
        guest.domain_xml = _libvirt(world).lookupByName(
            f"instance-{guest.server_id}").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def _libvirt(world: World) -> libvirt.virConnect:
    return libvirt.open(qemu.uri(world.plan.state_dir))


def bare_domain(domain_xml: str, *, nics: bool = False) -> str:
    """The same domain (kernel, initramfs, CPU, memory) under a fresh name, without its
    disks and serial file: what libvirt and QEMU take to start it alone. With `nics`, its
    NICs stay (the same bridge, and the nwfilter where the node uses them; tap name, MAC and
    PCI address left to libvirt), so the start includes libvirt's tap setup; else they go
    too."""
    root = ET.fromstring(domain_xml)
    name = root.find("name")
    assert name is not None
    name.text = f"bench-raw-{uuid.uuid4().hex[:8]}"
    for tag in ("uuid", "metadata"):
        for found in root.findall(tag):
            root.remove(found)
    devices = root.find("devices")
    assert devices is not None
    for tag in ("disk", "serial", "console", "filesystem", *(() if nics else ("interface",))):
        for found in devices.findall(tag):
            devices.remove(found)
    for nic in devices.findall("interface"):
        for tag in ("target", "mac", "alias", "address"):
            for found in nic.findall(tag):
                nic.remove(found)
    return ET.tostring(root, encoding="unicode")


def raw_starts(world: World, guest: Guest, count: int = RAW_STARTS) -> dict[str, list[float]]:
    """Seconds libvirt's createXML takes to start the guest's domain bare, and bare with its
    NICs, `count` times each (each destroyed after): libvirt's and QEMU's own share, no nubis
    in it. Run while the guest's network and port filter exist, the guest paused meanwhile
    (so it takes no CPU from these starts)."""
    connection = _libvirt(world)
    took: dict[str, list[float]] = {"bare": [], "nics": []}
    try:
        guest_domain = connection.lookupByName(f"instance-{guest.server_id}")
        guest_domain.suspend()
        for _ in range(count):
            for variant in took:
                began = time.perf_counter()
                domain = connection.createXML(
                    bare_domain(guest.domain_xml, nics=variant == "nics"), 0)
                took[variant].append(time.perf_counter() - began)
                domain.destroy()
    finally:
        connection.close()
    return took


async def _follow(world: World, guest: Guest, within: float) -> None:
    compute = world.compute
    async with asyncio.timeout(within):
        while not guest.started:
            await _steps(world, guest)
            await asyncio.sleep(CONSOLE_POLL)
        while not guest.address:
            log = (await compute.GetConsoleLog(instance_verbs_pb2.GetConsoleLogRequest(
                id=guest.server_id))).output
            now = time.time()
            if not guest.up and UP.search(log):
                guest.up = now
            if not guest.address and ADDRESS.search(log):
                guest.address = now
            await asyncio.sleep(CONSOLE_POLL)


async def _steps(world: World, guest: Guest) -> None:
    reply = await world.compute.ListInstanceActions(
        instance_action_pb2.ListInstanceActionsRequest(instance_id=guest.server_id,
                                                       page_size=10))
    for action in reply.actions:
        if action.action != "create":
            continue
        if action.events:  # the first step starts once the build is admitted and scheduled
            guest.steps["(create -> first step)"] = (
                action.events[0].start_time.ToNanoseconds() / 1e9 - guest.sent)
        for event in action.events:
            if event.HasField("finish_time"):
                guest.steps[event.name] = (event.finish_time.ToNanoseconds()
                                           - event.start_time.ToNanoseconds()) / 1e9
                if event.name == "spawn":
                    guest.started = event.finish_time.ToNanoseconds() / 1e9


def qemu_rss_mib(domain: str) -> float:
    """RSS of the QEMU process whose command line names the domain (`guest=NAME,`)."""
    wanted = f"guest={domain},".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if wanted not in (entry / "cmdline").read_bytes():
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            continue
    return 0.0


async def round_of(world: World, shape: Instance, count: int, wait: float,
                   raw: dict[str, list[float]] | None = None) -> list[Guest]:
    """The round's guests booted and followed; with `raw`, the raw starts of the first
    guest's domain (`raw_starts`) put in it before the servers are deleted."""
    guests = [Guest(f"bench-{count}-{i}") for i in range(count)]

    async def create(guest: Guest) -> None:
        made = Instance()
        made.CopyFrom(shape)
        made.meta.name = made.hostname = guest.name
        guest.sent = time.time()
        reply = await world.compute.CreateInstance(R.CreateInstanceRequest(instance=made))
        guest.server_id = reply.meta.id
        await follow(world, guest, wait)

    try:
        await asyncio.gather(*(create(g) for g in guests))
        if raw is not None and guests[0].domain_xml:
            raw.update(await asyncio.to_thread(raw_starts, world, guests[0]))
    finally:
        ids = [g.server_id for g in guests if g.server_id]
        print(f"  delete: {await delete_all(world.compute, ids, len(ids) or 1)}",
              file=sys.stderr)
    return guests


def report(count: int, guests: list[Guest]) -> list[str]:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):6.2f}" if values else "     -"

    def spans(since: str, until: str) -> list[float]:
        return [getattr(g, until) - getattr(g, since) for g in guests
                if getattr(g, since) and getattr(g, until)]

    control = spans("sent", "started")
    late = [g.name for g in guests if not g.address]
    lines = [f"{count} guest(s) at once: median of {len(guests)} (max)"
             + (f"; did not say an address in time: {', '.join(late)}" if late else ""),
             f"  control plane (create -> domain started) {med(control)} s "
             f"({max(control, default=0):.2f}) goal < {GOAL_CONTROL_S:g} s"
             f"{'' if control and max(control) < GOAL_CONTROL_S else '  NOT MET'}",
             f"  guest boot (started -> NUBIS-GUEST-UP)   {med(spans('started', 'up'))} s",
             f"  started -> its DHCP address              {med(spans('started', 'address'))} s",
             f"  create -> NUBIS-GUEST-UP                 {med(spans('sent', 'up'))} s",
             f"  QEMU RSS per guest                       "
             f"{med([g.rss_mib for g in guests if g.rss_mib])} MiB"]
    for name in sorted({name for g in guests for name in g.steps}):
        took = [g.steps[name] for g in guests if name in g.steps]
        lines.append(f"    step {name:<28} {med(took)} s")
    return lines


def raw_report(guest: Guest, raw: dict[str, list[float]]) -> list[str]:
    """libvirt's own start of the same domain beside the control plane's time."""
    if not guest.started:
        return []
    control = guest.started - guest.sent
    bare, nics = (statistics.median(raw[variant]) for variant in ("bare", "nics"))
    nubis_s = control - nics
    return [f"  libvirt createXML of the same domain alone (median of {len(raw['nics'])}): "
            f"bare {bare:.2f} s, with its NICs (tap, bridge, filter) {nics:.2f} s",
            f"  nubis's own share (control plane - libvirt's start with NICs) {nubis_s:6.2f} s "
            f"goal < {GOAL_CONTROL_S:g} s{'' if nubis_s < GOAL_CONTROL_S else '  NOT MET'}"]


async def measure(world: World, rounds: list[int], wait: float) -> list[str]:
    try:
        shape = await prepare(world)
        lines: list[str] = []
        for index, count in enumerate(rounds):
            raw: dict[str, list[float]] = {}
            # The node's first boot of the guest fetches its kernel and ramdisk into the
            # image cache; libvirt's own start is timed on a later round, warm.
            timed = count == 1 and index > 0
            guests = await round_of(world, shape, count, wait, raw if timed else None)
            said = report(count, guests)
            if index == 0:
                said[0] += " [first boot on the node: kernel and ramdisk fetched to its cache]"
            if raw:
                said += raw_report(guests[0], raw)
            print("\n".join(said), flush=True)
            lines += said
        return lines
    finally:
        await world.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", default="1,1,4",
                        help="guests booted at once, per round (the first round is the "
                        "node's first boot of the image)")
    parser.add_argument("--wait", type=float, default=180.0)
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="lab state dir (default: a fresh one, purged after)")
    args = parser.parse_args()
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="nubis-gbench-")) / "lab"
    world = start_lab(state_dir)
    try:
        lines = asyncio.run(measure(world, [int(n) for n in args.rounds.split(",")], args.wait))
    finally:
        runner.down(state_dir, purge=args.state_dir is None, grace=5.0)
        if args.state_dir is None:
            shutil.rmtree(state_dir.parent, ignore_errors=True)
    return 1 if any("did not say" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
