"""The agent's compute tasks end to end: real agents (Celery workers), the shared task sender,
real libvirt.

Every answer is read from the node's libvirt through its agent (domain_status,
list_domains), never from a record. On the test driver the domains live in
the agent's memory and no guest runs, so its console logs stay empty; the
`qemu` test boots a real guest under TCG in a private libvirtd and reads
what it printed on its serial console.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import image_cache
from services.agent.tasks import compute as compute_tasks
from services.client.lab import seed
from services.common import errors, tasks
from services.common.task_sender import SenderConfig, TaskSender
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness
from tests.functional.libvirtd import private_libvirtd

Disk = tasks_pb2.DomainDisk
Nic = tasks_pb2.DomainInterface


class Node:
    """One agent's node and a way to run its tasks."""

    def __init__(self, agents: agent_harness.AgentLauncher, sender: TaskSender,
                 directory: Path, **env: str) -> None:
        self.name = f"cp-{uuid.uuid4().hex[:8]}"
        self.directory = directory
        self.consoles = directory / "console"
        self.cache = directory / "cache"
        self._sender = sender
        self._agents = agents
        self._env = {**agent_harness.storage_env(directory),
                     "NUBIS_AGENT__CONSOLE_LOG_DIR": str(self.consoles),
                     "NUBIS_AGENT__STATE_DIR": str(directory / "state"), **env}
        self.agent = agents.start(self.name, env=self._env)

    def restart(self) -> None:
        """Start the node's agent again (after it was killed)."""
        self.agent = self._agents.start(self.name, env=self._env)

    async def run(self, spec: tasks.TaskSpec[Any, tasks.Resp], request: Any,
                  deadline: float | None = None) -> tasks.Resp:
        return await self._sender.send(self.name, spec, request,
                                       operation_id=tasks.new_operation_id(), deadline=deadline)

    async def spawn(self, domain: tasks_pb2.DomainSpec) -> tasks_pb2.DomainStatus:
        return await self.run(tasks.SPAWN, tasks_pb2.SpawnRequest(domain=domain))

    async def status(self, name: str) -> tasks_pb2.DomainStatus:
        return await self.run(tasks.DOMAIN_STATUS, tasks_pb2.DomainStatusRequest(name=name))

    async def listed(self) -> dict[str, tasks_pb2.DomainStatus]:
        reply = await self.run(tasks.LIST_DOMAINS, tasks_pb2.ListDomainsRequest())
        return {domain.name: domain for domain in reply.domains}


async def start_node(agents: agent_harness.AgentLauncher, sender: TaskSender, directory: Path,
                     **env: str) -> Node:
    node = Node(agents, sender, directory, **env)
    await node.run(tasks.PING, tasks_pb2.PingRequest(), deadline=40)
    return node


@pytest.fixture(scope="module")
def module_agents(etcd: EtcdEndpoint, redis: RedisEndpoint,
                  tmp_path_factory: pytest.TempPathFactory,
                  ) -> Iterator[agent_harness.AgentLauncher]:
    yield from agent_harness.launcher(etcd, redis, f"/test-{uuid.uuid4().hex[:12]}",
                                      tmp_path_factory.mktemp("agents"))


@pytest.fixture(scope="module")
async def module_sender(redis: RedisEndpoint) -> AsyncIterator[TaskSender]:
    made = await TaskSender.connect(SenderConfig(broker_url=redis.url, result_url=redis.url))
    yield made
    await made.close()


@pytest.fixture(scope="module")
async def node(module_agents: agent_harness.AgentLauncher, module_sender: TaskSender,
               tmp_path_factory: pytest.TempPathFactory) -> Node:
    """One test-driver node for the tests here (each uses domains of its own)."""
    return await start_node(module_agents, module_sender, tmp_path_factory.mktemp("node"))


def domain_spec(**fields: Any) -> tasks_pb2.DomainSpec:
    """A spec of a new instance's domain: its root disk, and `fields` over the defaults."""
    instance = str(uuid.uuid4())
    root = Disk(volume_id=instance, path=f"/var/lib/nubis/pools/nubis/volume-{instance}",
                format="qcow2", target_dev="vda", boot=True)
    defaults: dict[str, Any] = {"name": f"instance-{instance}", "uuid": instance, "vcpus": 1,
                                "memory_mb": 64, "project_id": "project-1",
                                "hostname": "guest-1", "disks": [root]}
    return tasks_pb2.DomainSpec(**{**defaults, **fields})


def nic(mac: str = "52:54:00:12:34:56") -> Nic:
    return Nic(port_id=str(uuid.uuid4()), mac=mac, network_id=str(uuid.uuid4()), mtu=1450,
               filterref_xml="<filterref filter='nubis-port-x'/>")


@pytest.mark.timeout(90)
async def test_a_domain_is_spawned_powered_rebooted_hot_plugged_and_destroyed(
    node: Node,
) -> None:
    spec = domain_spec(interfaces=[nic()], hostname="web server 1")  # any text, kept as is
    name = spec.name
    spawned = await node.spawn(spec)
    assert (spawned.name, spawned.uuid, spawned.state) == (name, spec.uuid, "running")
    assert spawned.instance_id == spec.uuid
    assert (list(spawned.disk_targets), list(spawned.interface_macs)) == (
        ["vda"], ["52:54:00:12:34:56"])
    listed = await node.listed()
    assert listed[name].state == "running" and listed[name].instance_id == spec.uuid
    assert listed["test"].instance_id == ""  # the test driver's own domain is not nubis's

    off = await node.run(tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name=name,
                                                                    timeout_seconds=5))
    assert off.state == "shutoff" and (await node.status(name)).state == "shutoff"
    again = await node.run(tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name=name))
    assert again.state == "shutoff"
    on = await node.run(tasks.POWER_ON, tasks_pb2.DomainRequest(name=name))
    assert on.state == "running" and on.instance_id == spec.uuid
    for hard in (False, True):
        rebooted = await node.run(tasks.REBOOT, tasks_pb2.RebootRequest(name=name, hard=hard,
                                                                        timeout_seconds=5))
        assert rebooted.state == "running"

    disk = Disk(path="/var/lib/nubis/pools/nubis/volume-data", format="raw", target_dev="vdb")
    second_nic = nic("52:54:00:12:34:57")
    for _ in range(2):  # attaching what is there is done
        plugged = await node.run(tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(name=name,
                                                                              disk=disk))
        assert list(plugged.disk_targets) == ["vda", "vdb"]
        plugged = await node.run(tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(
            name=name, interface=second_nic))
        assert list(plugged.interface_macs) == ["52:54:00:12:34:56", "52:54:00:12:34:57"]
    for _ in range(2):  # detaching what is not there is done
        unplugged = await node.run(tasks.DETACH_DEVICE, tasks_pb2.DeviceRequest(
            name=name, disk=Disk(target_dev="vdb")))
        assert list(unplugged.disk_targets) == ["vda"]
        unplugged = await node.run(tasks.DETACH_DEVICE, tasks_pb2.DeviceRequest(
            name=name, interface=Nic(mac="52:54:00:12:34:57".upper())))
        assert list(unplugged.interface_macs) == ["52:54:00:12:34:56"]
    assert (await node.status(name)).state == "running"

    console = await node.run(tasks.CONSOLE_LOG, tasks_pb2.ConsoleLogRequest(name=name))
    assert (console.output, console.truncated) == ("", False)  # no guest prints here

    gone = await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=name))
    assert gone.changed and name not in await node.listed()
    again_gone = await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=name))
    assert not again_gone.changed


@pytest.mark.timeout(60)
async def test_a_spawn_delivered_again_makes_one_domain(node: Node) -> None:
    spec = domain_spec()
    first, second = await asyncio.gather(node.spawn(spec), node.spawn(spec))
    third = await node.spawn(spec)
    assert {first.uuid, second.uuid, third.uuid} == {spec.uuid}
    assert third.state == "running"
    mine = [d for d in (await node.listed()).values() if d.instance_id == spec.uuid]
    assert [(d.name, d.state) for d in mine] == [(spec.name, "running")]
    # A spawn of a domain found shut off (stopped between define and start) starts it.
    await node.run(tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name=spec.name))
    assert (await node.spawn(spec)).state == "running"
    await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))


@pytest.mark.timeout(60)
async def test_a_spawn_meeting_another_uuid_or_name_is_refused(node: Node) -> None:
    spec = domain_spec()
    await node.spawn(spec)
    other_uuid = tasks_pb2.DomainSpec()
    other_uuid.CopyFrom(spec)
    other_uuid.uuid = str(uuid.uuid4())
    with pytest.raises(errors.FailedPrecondition) as caught:
        await node.spawn(other_uuid)
    assert caught.value.reason == compute_tasks.CONFLICT
    assert caught.value.metadata["existing_uuid"] == spec.uuid
    other_name = tasks_pb2.DomainSpec()
    other_name.CopyFrom(spec)
    other_name.name = f"instance-{uuid.uuid4()}"
    with pytest.raises(errors.FailedPrecondition) as caught:
        await node.spawn(other_name)
    assert caught.value.reason == compute_tasks.CONFLICT
    assert caught.value.metadata["existing_domain"] == spec.name
    listed = await node.listed()
    assert listed[spec.name].uuid == spec.uuid and other_name.name not in listed
    await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))


@pytest.mark.timeout(60)
async def test_a_missing_domain_is_not_found_and_its_destroy_is_done(node: Node) -> None:
    name = f"instance-{uuid.uuid4()}"
    cases: list[tuple[tasks.TaskSpec[Any, Any], Any]] = [
        (tasks.DOMAIN_STATUS, tasks_pb2.DomainStatusRequest(name=name)),
        (tasks.CONSOLE_LOG, tasks_pb2.ConsoleLogRequest(name=name)),
        (tasks.POWER_ON, tasks_pb2.DomainRequest(name=name)),
        (tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name=name)),
        (tasks.REBOOT, tasks_pb2.RebootRequest(name=name)),
        (tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(name=name, disk=Disk(
            path="/pool/v", format="raw", target_dev="vdb"))),
    ]
    for spec, request in cases:
        with pytest.raises(errors.NotFound) as caught:
            await node.run(spec, request)
        assert caught.value.reason == compute_tasks.MISSING, spec.name
    reply = await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=name))
    assert not reply.changed


@pytest.mark.timeout(60)
async def test_bad_requests_name_their_fields(node: Node) -> None:
    spec = domain_spec(interfaces=[nic("not-a-mac")], vcpus=0, hostname="bell\x07")
    spec.disks.append(Disk(path="relative/path", format="vmdk", target_dev="vda"))
    with pytest.raises(errors.InvalidArgument) as caught:
        await node.spawn(spec)
    fields = {v.field for v in caught.value.violations}
    assert {"domain.vcpus", "domain.interfaces[0].mac", "domain.disks[1].path",
            "domain.disks[1].format", "domain.disks[1].target_dev", "domain.hostname"} <= fields
    with pytest.raises(errors.InvalidArgument) as caught:
        await node.run(tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name="x", timeout_seconds=-1))
    assert [v.field for v in caught.value.violations] == ["timeout_seconds"]
    with pytest.raises(errors.InvalidArgument) as caught:
        await node.run(tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(name="x"))
    assert [v.field for v in caught.value.violations] == ["device"]


@pytest.mark.timeout(60)
async def test_live_migration_on_the_test_driver_says_why_it_cannot(node: Node) -> None:
    spec = domain_spec()
    await node.spawn(spec)
    with pytest.raises(errors.FailedPrecondition) as caught:
        await node.run(tasks.MIGRATE, tasks_pb2.MigrateRequest(
            name=spec.name, destination_uri="qemu+tcp://other/system"))
    assert caught.value.reason == compute_tasks.MIGRATION_UNSUPPORTED
    assert "test driver" in caught.value.message
    assert (await node.status(spec.name)).state == "running"
    await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))


@pytest.mark.timeout(60)
async def test_a_kernel_boot_spawn_puts_the_kernel_in_the_image_cache(node: Node) -> None:
    """The kernel is fetched into the node's cache before the domain is defined; here its
    bytes are already in the cache directory, as a test-driver node keeps them."""
    kernel = b"\x7fELF not really a kernel" * 100
    image_id = str(uuid.uuid4())
    node.cache.mkdir(parents=True, exist_ok=True)
    (node.cache / image_cache.volume_name(image_id)).write_bytes(kernel)
    source = tasks_pb2.CachedImageSource(image_id=image_id, size_bytes=len(kernel),
                                         sha256=hashlib.sha256(kernel).hexdigest(),
                                         disk_format="kernel")
    spec = domain_spec(kernel_boot=tasks_pb2.KernelBoot(kernel=source,
                                                        cmdline="console=ttyS0"))
    assert (await node.spawn(spec)).state == "running"
    cached = await node.run(tasks.VOLUME_INFO, tasks_pb2.VolumeInfoRequest(
        name=image_cache.volume_name(image_id)))
    assert cached.found and cached.volume.capacity_bytes == len(kernel)
    await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))


MARKER = "nubis lab guest: booted"
"""What the lab image's boot sector prints on the serial console."""


async def console_shows(node: Node, name: str, text: str, times: int) -> None:
    """Wait until the domain's console log holds `text` `times` times."""
    give_up = time.monotonic() + 30
    while True:
        console = await node.run(tasks.CONSOLE_LOG, tasks_pb2.ConsoleLogRequest(name=name))
        if console.output.count(text) >= times:
            return
        assert time.monotonic() < give_up, f"the guest printed {console.output!r}"
        await asyncio.sleep(0.3)


def vcpu_policies(domain: str) -> dict[str, set[int]]:
    """The scheduling policies of the domain's QEMU threads: its vCPUs' and the others'."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and f"guest={domain},".encode() in cmdline:
            found: dict[str, set[int]] = {"vcpu": set(), "other": set()}
            for task in (entry / "task").iterdir():
                name = (task / "comm").read_text().strip()
                kind = "vcpu" if name.startswith("CPU ") else "other"
                found[kind].add(os.sched_getscheduler(int(task.name)))
            return found
    raise AssertionError(f"no QEMU process runs domain {domain}")


@pytest.fixture
def qemu_uri() -> Iterator[str]:
    with private_libvirtd() as uri:
        yield uri


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_on_qemu_a_real_guest_boots_prints_on_its_console_and_is_destroyed(
    agents: agent_harness.AgentLauncher, sender: TaskSender, tmp_path: Path, qemu_uri: str,
) -> None:
    """The lab image's boot sector prints a line on the serial console; the agent reads it
    back from the log libvirt keeps. A second spawn of the same request changes nothing; a
    power-off the guest ignores ends in a power cut after its timeout; a disk attached while
    the domain is off is there when it starts; each boot adds its line to the log."""
    started = time.monotonic()
    node = await start_node(agents, sender, tmp_path / "node", NUBIS_AGENT__LIBVIRT_URI=qemu_uri,
                            NUBIS_AGENT__VIRT_TYPE="qemu", NUBIS_AGENT__DATAPLANE="recording",
                            NUBIS_AGENT__STORAGE_POOL=f"nubis-{uuid.uuid4().hex[:6]}",
                            NUBIS_AGENT__TCG_VCPU_SCHEDULER="idle")
    image = seed.make_image(tmp_path / "disk" / seed.IMAGE_FILE)
    spec = domain_spec(memory_mb=64)
    spec.disks[0].path = str(image)
    spawned = await node.spawn(spec)
    assert spawned.state == "running" and spawned.instance_id == spec.uuid
    # Under TCG the guest's vCPU runs only on CPU nothing else wants; QEMU's others as any.
    policies = vcpu_policies(spec.name)
    assert policies["vcpu"] == {os.SCHED_IDLE} and policies["other"] == {os.SCHED_OTHER}

    await console_shows(node, spec.name, MARKER, 1)
    tail = await node.run(tasks.CONSOLE_LOG, tasks_pb2.ConsoleLogRequest(
        name=spec.name, max_bytes=8))
    assert tail.truncated and len(tail.output.encode()) <= 8

    again = await node.spawn(spec)
    assert (again.uuid, again.state) == (spec.uuid, "running")
    mine = [d for d in (await node.listed()).values() if d.instance_id == spec.uuid]
    assert [(d.name, d.state) for d in mine] == [(spec.name, "running")]

    broken = domain_spec(memory_mb=64)
    broken.disks[0].path = str(tmp_path / "no-such-disk.qcow2")
    with pytest.raises(errors.FailedPrecondition) as caught:
        await node.spawn(broken)
    assert caught.value.reason == compute_tasks.START_FAILED
    assert "no-such-disk" in caught.value.message
    assert broken.name not in await node.listed()  # a domain that cannot start is not kept

    # The guest only halts, deaf to ACPI: the power-off waits its timeout, then cuts power.
    asked = time.monotonic()
    off = await node.run(tasks.POWER_OFF, tasks_pb2.PowerOffRequest(name=spec.name,
                                                                    timeout_seconds=1))
    assert off.state == "shutoff" and time.monotonic() - asked >= 1
    data = tmp_path / "disk" / "data.raw"
    data.write_bytes(bytes(1 << 20))
    plugged = await node.run(tasks.ATTACH_DEVICE, tasks_pb2.DeviceRequest(
        name=spec.name, disk=Disk(path=str(data), format="raw", target_dev="vdb")))
    assert list(plugged.disk_targets) == ["vda", "vdb"]
    on = await node.run(tasks.POWER_ON, tasks_pb2.DomainRequest(name=spec.name))
    assert on.state == "running"
    await console_shows(node, spec.name, MARKER, 2)  # the log is appended to, boot after boot
    rebooted = await node.run(tasks.REBOOT, tasks_pb2.RebootRequest(name=spec.name, hard=True))
    assert rebooted.state == "running"
    await console_shows(node, spec.name, MARKER, 3)

    gone = await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))
    assert gone.changed and spec.name not in await node.listed()
    assert not (node.consoles / f"{spec.name}.log").exists()
    assert time.monotonic() - started < 60


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_on_qemu_an_agent_killed_during_a_spawn_leaves_one_running_domain(
    agents: agent_harness.AgentLauncher, sender: TaskSender, tmp_path: Path, qemu_uri: str,
) -> None:
    """The agent dies once libvirt has the domain; the broker hands the spawn to the
    restarted agent, which finds the domain libvirt kept and answers it: one domain."""
    node = await start_node(agents, sender, tmp_path / "node", NUBIS_AGENT__LIBVIRT_URI=qemu_uri,
                            NUBIS_AGENT__VIRT_TYPE="qemu", NUBIS_AGENT__DATAPLANE="recording",
                            NUBIS_AGENT__REDELIVERY_TIMEOUT="1",
                            NUBIS_AGENT__STORAGE_POOL=f"nubis-{uuid.uuid4().hex[:6]}")
    spec = domain_spec(memory_mb=64)
    spec.disks[0].path = str(seed.make_image(tmp_path / "disk" / seed.IMAGE_FILE))
    hypervisor = libvirt.open(qemu_uri)
    try:
        pending = asyncio.create_task(node.spawn(spec))
        give_up = time.monotonic() + 30
        while spec.name not in [d.name() for d in hypervisor.listAllDomains(0)]:
            assert time.monotonic() < give_up and not pending.done(), "no domain was defined"
            await asyncio.sleep(0.005)
        killed = node.agent
        killed.kill()
        node.restart()
        reply = await pending
        # The answer is the redelivered task's: the killed agent never finished its spawn.
        assert "compute.spawn" in killed.log_path.read_text()
        assert "succeeded" not in killed.log_path.read_text().split("compute.spawn[", 1)[1]
        assert "compute.spawn" in node.agent.log_path.read_text()
        assert (reply.uuid, reply.state) == (spec.uuid, "running")
        assert [d.UUIDString() for d in hypervisor.listAllDomains(0)
                if d.name() == spec.name] == [spec.uuid]
        assert hypervisor.lookupByUUIDString(spec.uuid).isActive()
    finally:
        hypervisor.close()
    gone = await node.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))
    assert gone.changed and spec.name not in await node.listed()


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_on_qemu_a_running_guest_migrates_live_with_its_disk_to_another_node(
    agents: agent_harness.AgentLauncher, sender: TaskSender, tmp_path: Path,
) -> None:
    """Two nodes, each its own libvirtd: a block live migration copies the disk into the
    destination's file and leaves the domain running there, persistent, gone from the
    source; the migrate delivered again finds it done. Both nodes log consoles to one path,
    as every node does by default, so the guest's log goes on in the same file."""
    with private_libvirtd() as source_uri, private_libvirtd() as destination_uri:
        nodes: list[Node] = []
        for uri in (source_uri, destination_uri):
            nodes.append(await start_node(
                agents, sender, tmp_path / f"node-{len(nodes)}", NUBIS_AGENT__LIBVIRT_URI=uri,
                NUBIS_AGENT__VIRT_TYPE="qemu", NUBIS_AGENT__DATAPLANE="recording",
                NUBIS_AGENT__CONSOLE_LOG_DIR=str(tmp_path / "console"),
                NUBIS_AGENT__STORAGE_POOL=f"nubis-{uuid.uuid4().hex[:6]}"))
        source, destination = nodes
        spec = domain_spec(memory_mb=64)
        spec.disks[0].path = str(seed.make_image(tmp_path / "disk" / seed.IMAGE_FILE))
        await source.spawn(spec)
        await console_shows(source, spec.name, MARKER, 1)

        moved = tasks_pb2.DomainSpec()
        moved.CopyFrom(spec)
        moved.disks[0].path = str(tmp_path / "disk" / "on-destination.qcow2")
        await asyncio.to_thread(subprocess.run, [
            "qemu-img", "create", "-q", "-f", "qcow2", moved.disks[0].path,
            seed.IMAGE_VIRTUAL_SIZE], check=True, timeout=30)
        request = tasks_pb2.MigrateRequest(name=spec.name, destination_uri=destination_uri,
                                           block_migration=True, destination=moved)
        reply = await source.run(tasks.MIGRATE, request)
        assert (reply.uuid, reply.state, reply.instance_id) == (spec.uuid, "running", spec.uuid)
        assert spec.name not in await source.listed()
        there = await destination.status(spec.name)
        assert there.state == "running" and list(there.disk_targets) == ["vda"]
        again = await source.run(tasks.MIGRATE, request)
        assert again.state == "running"
        console = await destination.run(tasks.CONSOLE_LOG,
                                        tasks_pb2.ConsoleLogRequest(name=spec.name))
        assert MARKER in console.output
        gone = await destination.run(tasks.DESTROY, tasks_pb2.DestroyRequest(name=spec.name))
        assert gone.changed
