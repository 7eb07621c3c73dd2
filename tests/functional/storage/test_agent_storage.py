"""The agent's storage tasks end to end: real agents, the shared task sender, real libvirt.

Every answer is read back from the node's libvirt through its agent
(volume_info, pool_info), never from a record. On the test driver a volume
is libvirt's in-memory record, so an agent restarted is an empty host; its
image cache directory is real and outlives it. The `qemu` tests run a
private libvirtd whose `dir` pool keeps real files across an agent's death.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.agent import heartbeat, image_cache
from services.agent.tasks import storage as storage_tasks
from services.client.lab import daemons
from services.common import errors, tasks
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness
from tests.functional.authz.world import PASSWORD
from tests.functional.libvirtd import private_libvirtd
from tests.functional.storage.harness import MIB, Format, StorageWorld, qcow2_bytes, raw_bytes

GIB = 1 << 30
Source = tasks_pb2.CachedImageSource


def _launcher(etcd: EtcdEndpoint, redis: RedisEndpoint, directory: Path,
              storage: StorageWorld) -> Iterator[agent_harness.AgentLauncher]:
    """Agents that may fetch images: identity's address and the world's service user."""
    password_file = directory / "service-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    env = agent_harness.service_credential_env(
        storage.world.identity.running.address, password_file,
        user=storage.world.names["service"], project=storage.settings.auth.admin_project)
    yield from agent_harness.launcher(etcd, redis, f"/test-{uuid.uuid4().hex[:12]}",
                                      directory / "logs", env)


@pytest.fixture
def agents(etcd: EtcdEndpoint, redis: RedisEndpoint, tmp_path: Path,
           storage: StorageWorld) -> Iterator[agent_harness.AgentLauncher]:
    yield from _launcher(etcd, redis, tmp_path, storage)


@pytest.fixture(scope="module")
def module_agents(etcd: EtcdEndpoint, redis: RedisEndpoint, storage: StorageWorld,
                  tmp_path_factory: pytest.TempPathFactory,
                  ) -> Iterator[agent_harness.AgentLauncher]:
    yield from _launcher(etcd, redis, tmp_path_factory.mktemp("agents"), storage)


@pytest.fixture(scope="module")
async def sender(redis: RedisEndpoint) -> AsyncIterator[TaskSender]:
    made = await TaskSender.connect(SenderConfig(broker_url=redis.url, result_url=redis.url))
    yield made
    await made.close()


@pytest.fixture(scope="module")
async def shared_node(module_agents: agent_harness.AgentLauncher, sender: TaskSender,
                      tmp_path_factory: pytest.TempPathFactory) -> Node:
    """One node for the tests that need no restart (each uses volumes of its own); it
    reads its pools again every second."""
    return await start_node(module_agents, sender, tmp_path_factory.mktemp("node"),
                            NUBIS_AGENT__FACTS_INTERVAL="1")


class Node:
    """One agent's node: its name, directories and a way to run its tasks."""

    def __init__(self, agents: agent_harness.AgentLauncher, sender: TaskSender,
                 directory: Path, env: dict[str, str]) -> None:
        self.name = f"st-{uuid.uuid4().hex[:8]}"
        self.key_prefix = agents.key_prefix
        self.etcd_endpoint = agents.etcd_endpoint
        self.directory = directory
        self.env = {**agent_harness.storage_env(directory), **env}
        self._agents = agents
        self._sender = sender
        self.agent = agents.start(self.name, env=self.env)

    @property
    def cache(self) -> Path:
        return self.directory / "cache"

    def restart(self) -> daemons.Daemon:
        self.agent = self._agents.start(self.name, env=self.env)
        return self.agent

    async def run(self, spec: tasks.TaskSpec[Any, tasks.Resp], request: Any,
                  deadline: float | None = None) -> tasks.Resp:
        return await self._sender.send(self.name, spec, request,
                                       operation_id=tasks.new_operation_id(), deadline=deadline)

    async def volume(self, name: str) -> tasks_pb2.VolumeInfoResponse:
        """The volume as the node's libvirt reports it now."""
        return await self.run(tasks.VOLUME_INFO, tasks_pb2.VolumeInfoRequest(name=name))

    async def pool(self) -> tasks_pb2.StoragePoolInfo:
        return await self.run(tasks.POOL_INFO, tasks_pb2.PoolInfoRequest())

    async def report(self) -> scheduler_pb2.NodeReport | None:
        """What the node's agent last published under its lease."""
        store = await Store.connect([self.etcd_endpoint], root=self.key_prefix)
        try:
            found = await store.find(heartbeat.node_key(self.name), scheduler_pb2.NodeReport)
        finally:
            await store.close()
        return None if found is None else found.value


async def start_node(agents: agent_harness.AgentLauncher, sender: TaskSender, directory: Path,
                     **env: str) -> Node:
    node = Node(agents, sender, directory, env)
    await node.run(tasks.PING, tasks_pb2.PingRequest(), deadline=40)
    return node


def name(kind: str = "volume") -> str:
    return f"{kind}-{uuid.uuid4()}"


def source_of(image_id: str, data: bytes, disk_format: str = "raw") -> Source:
    return Source(image_id=image_id, size_bytes=len(data),
                  sha256=hashlib.sha256(data).hexdigest(), disk_format=disk_format)


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            outcome = predicate()
            if outcome if isinstance(outcome, bool) else await outcome:
                return
            await asyncio.sleep(0.01)


@pytest.mark.timeout(90)
async def test_volumes_are_made_grown_copied_and_deleted_in_the_pool(
    shared_node: Node,
) -> None:
    node = shared_node
    pool = await node.pool()
    assert (pool.name, pool.path, pool.active) == ("nubis", str(node.directory / "pool"), True)
    before = pool.volume_count
    # The node's report carries its pools, and its disk is its pool's, from one reading.
    report = await node.report()
    assert report is not None
    reported = {p.name: p for p in report.pools}  # the test driver has its default-pool too
    assert (reported["nubis"].path, reported["nubis"].active) == (pool.path, True)
    assert reported["nubis"].capacity_bytes == pool.capacity_bytes > 0
    assert [p.name for p in report.pools if p.node_pool] == ["nubis"]
    assert report.capacity.disk_gb == pool.capacity_bytes // GIB

    volume = name()
    blank = tasks_pb2.EnsureVolumeRequest(name=volume, capacity_bytes=GIB)
    made = await node.run(tasks.ENSURE_VOLUME, blank)
    assert made.changed and (made.volume.capacity_bytes, made.volume.format) == (GIB, "qcow2")
    # The same task again (a repeat, a redelivery) finds it done: still one volume.
    again = await node.run(tasks.ENSURE_VOLUME, blank)
    assert not again.changed and again.volume.path == made.volume.path
    seen = await node.volume(volume)
    assert seen.found and seen.volume.capacity_bytes == GIB
    assert (await node.pool()).volume_count == before + 1
    with pytest.raises(errors.FailedPrecondition) as other:
        await node.run(tasks.ENSURE_VOLUME,
                       tasks_pb2.EnsureVolumeRequest(name=volume, capacity_bytes=2 * GIB))
    assert other.value.reason == storage_tasks.MISMATCH

    grow = tasks_pb2.ResizeVolumeRequest(name=volume, capacity_bytes=2 * GIB)
    assert (await node.run(tasks.RESIZE_VOLUME, grow)).changed
    assert not (await node.run(tasks.RESIZE_VOLUME, grow)).changed
    assert (await node.volume(volume)).volume.capacity_bytes == 2 * GIB
    with pytest.raises(errors.FailedPrecondition) as shrink:
        await node.run(tasks.RESIZE_VOLUME,
                       tasks_pb2.ResizeVolumeRequest(name=volume, capacity_bytes=GIB))
    assert shrink.value.reason == storage_tasks.SHRINK

    snapshot = name("snapshot")
    snap = tasks_pb2.SnapshotVolumeRequest(volume_name=volume, snapshot_name=snapshot)
    copied = await node.run(tasks.SNAPSHOT_VOLUME, snap)
    assert copied.changed and copied.snapshot.capacity_bytes == 2 * GIB
    assert not copied.snapshot.backing_path  # a full copy, not an overlay
    assert not (await node.run(tasks.SNAPSHOT_VOLUME, snap)).changed

    child = name()
    from_snapshot = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=child, backing_volume=snapshot))
    assert from_snapshot.volume.backing_volume == snapshot
    assert from_snapshot.volume.capacity_bytes == 2 * GIB
    with pytest.raises(errors.FailedPrecondition) as in_use:
        await node.run(tasks.DELETE_VOLUME, tasks_pb2.DeleteVolumeRequest(name=snapshot))
    assert in_use.value.reason == storage_tasks.IN_USE
    assert child in in_use.value.metadata["dependents"]

    for gone in (child, snapshot, volume):
        delete = tasks_pb2.DeleteVolumeRequest(name=gone)
        assert (await node.run(tasks.DELETE_VOLUME, delete)).changed
        assert not (await node.run(tasks.DELETE_VOLUME, delete)).changed  # missing: done
        assert not (await node.volume(gone)).found
    assert (await node.pool()).volume_count == before

    with pytest.raises(errors.InvalidArgument) as invalid:
        await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
            name="../escape", capacity_bytes=0, format="vmdk"))
    assert {v.field for v in invalid.value.violations} == {"name", "capacity_bytes", "format"}
    with pytest.raises(errors.NotFound):
        await node.run(tasks.RESIZE_VOLUME, grow)


@pytest.mark.timeout(90)
@pytest.mark.timeout(90)
async def test_concurrent_deletes_of_volumes_of_one_pool_all_succeed(shared_node: Node) -> None:
    # Each delete lists the pool (are there volumes backed by this one?) while
    # the others delete: a volume gone between the listing and its lookup is
    # no error, so every delete succeeds, each at its first attempt.
    node = shared_node
    volumes = [name() for _ in range(64)]
    await asyncio.gather(*(
        node.run(tasks.ENSURE_VOLUME,
                 tasks_pb2.EnsureVolumeRequest(name=volume, capacity_bytes=GIB))
        for volume in volumes))
    deleted = await asyncio.gather(*(
        node.run(tasks.DELETE_VOLUME, tasks_pb2.DeleteVolumeRequest(name=volume))
        for volume in volumes))
    assert all(answer.changed for answer in deleted)
    for volume in volumes:
        assert not (await node.volume(volume)).found


async def test_images_are_fetched_once_checked_and_overlaid(
    shared_node: Node, storage: StorageWorld, tmp_path: Path,
) -> None:
    node = shared_node
    data = raw_bytes(3 * MIB + 17)
    image = await storage.active_image(data)
    source = source_of(image.meta.id, data)
    cached = image_cache.volume_name(image.meta.id)

    first = await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=source))
    assert first.changed and first.volume.name == cached
    assert first.volume.capacity_bytes == len(data)
    assert not (await node.run(tasks.FETCH_IMAGE,
                               tasks_pb2.FetchImageRequest(image=source))).changed
    # The node's next report shows the pool holding the image.
    async def reported_allocation() -> bool:
        report = await node.report()
        pools = {p.name: p for p in report.pools} if report is not None else {}
        return "nubis" in pools and pools["nubis"].allocation_bytes >= len(data)

    await wait_until(reported_allocation, 20)
    # The test driver keeps no files: the checked bytes stay in the cache directory.
    assert (node.cache / cached).read_bytes() == data
    assert sorted(p.name for p in node.cache.iterdir() if cached in p.name) == [
        cached, f"{cached}.sha256"]

    overlay = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=name(), capacity_bytes=GIB, backing_image=source))
    assert overlay.volume.backing_volume == cached and overlay.volume.format == "qcow2"
    full = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=name(), capacity_bytes=8 * MIB, format="raw", backing_image=source))
    assert (full.volume.backing_path, full.volume.capacity_bytes) == ("", 8 * MIB)
    with pytest.raises(errors.FailedPrecondition) as small:
        await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
            name=name(), capacity_bytes=MIB, backing_image=source))
    assert small.value.reason == storage_tasks.TOO_SMALL
    with pytest.raises(errors.FailedPrecondition) as in_use:
        await node.run(tasks.DELETE_VOLUME, tasks_pb2.DeleteVolumeRequest(name=cached))
    assert in_use.value.reason == storage_tasks.IN_USE
    # The cached copy was checked against the image's sha256; another one is not this image.
    other = source_of(image.meta.id, data)
    other.sha256 = hashlib.sha256(b"another image").hexdigest()
    with pytest.raises(errors.FailedPrecondition) as not_this:
        await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=other))
    assert not_this.value.reason == image_cache.BAD_IMAGE

    # A qcow2 image fetched on the way to its first volume, which takes its virtual size.
    qcow2 = qcow2_bytes(tmp_path, "16M")
    qimage = await storage.active_image(qcow2, disk_format=Format.DISK_FORMAT_QCOW2)
    root = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=name(), backing_image=source_of(qimage.meta.id, qcow2, "qcow2")))
    assert root.changed and root.volume.capacity_bytes == 16 * MIB
    assert root.volume.backing_volume == image_cache.volume_name(qimage.meta.id)


@pytest.mark.timeout(60)
async def test_an_image_that_does_not_verify_leaves_nothing(
    shared_node: Node, storage: StorageWorld,
) -> None:
    node = shared_node
    before = (await node.pool()).volume_count
    data = raw_bytes(2 * MIB, seed=11)
    image = await storage.active_image(data)
    wrong = source_of(image.meta.id, data)
    wrong.sha256 = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(errors.InvalidArgument) as refused:
        await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=wrong))
    assert refused.value.reason == image_cache.CHECKSUM
    longer = source_of(image.meta.id, data)
    longer.size_bytes = len(data) - 1
    with pytest.raises(errors.InvalidArgument):
        await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
            name=name(), capacity_bytes=GIB, backing_image=longer))
    assert [p for p in node.cache.glob("*") if image.meta.id in p.name] == []
    assert not (await node.volume(image_cache.volume_name(image.meta.id))).found
    assert (await node.pool()).volume_count == before
    # The right checksum still fetches it.
    right = source_of(image.meta.id, data)
    assert (await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=right))).changed


async def test_a_kernel_is_cached_for_direct_boot_but_never_backs_a_volume(
    shared_node: Node, storage: StorageWorld,
) -> None:
    node = shared_node
    data = raw_bytes(MIB + 5, seed=21)
    kernel = await storage.active_image(data, disk_format=Format.DISK_FORMAT_KERNEL)
    source = source_of(kernel.meta.id, data, "kernel")
    cached = await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=source))
    assert (cached.volume.format, cached.volume.capacity_bytes) == ("raw", len(data))
    with pytest.raises(errors.InvalidArgument) as refused:
        await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
            name=name(), capacity_bytes=GIB, backing_image=source))
    assert [v.field for v in refused.value.violations] == ["backing_image.disk_format"]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_task_redelivered_after_its_agent_was_killed_makes_one_volume(
    agents: agent_harness.AgentLauncher, sender: TaskSender, storage: StorageWorld,
    tmp_path: Path,
) -> None:
    """kill -9 mid-fetch (acks_late: the message stays unacknowledged); the restarted agent
    gets it again, resumes the download where the part file ended and makes one volume."""
    data = raw_bytes(64 * MIB, seed=3)
    image = await storage.active_image(data)
    node = await start_node(agents, sender, tmp_path / "node",
                            NUBIS_AGENT__REDELIVERY_TIMEOUT="1")
    source = source_of(image.meta.id, data)
    volume = name()
    part = node.cache / f"{image_cache.volume_name(image.meta.id)}.part"
    pending = asyncio.create_task(node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=volume, capacity_bytes=GIB, backing_image=source)))
    await wait_until(lambda: part.exists() and part.stat().st_size > 0, 60)
    node.agent.kill()
    left = part.stat().st_size
    assert 0 < left < len(data), "the download ended before the agent was killed"

    node.restart()
    reply = await pending  # the first send's outcome, from the second delivery
    assert reply.changed and reply.volume.backing_volume == image_cache.volume_name(
        image.meta.id)
    seen = await node.volume(volume)
    assert seen.found and seen.volume.capacity_bytes == GIB
    assert (await node.pool()).volume_count == 2  # the image and one volume
    cached = node.cache / image_cache.volume_name(image.meta.id)
    assert not part.exists() and cached.stat().st_size == len(data)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == source.sha256
    log = node.agent.log_path.read_text()
    assert "image downloaded" in log and f"resumed_at={left}" in log

    # Restarted once more, the node is an empty host again, but its cache directory
    # still holds the checked bytes: the image is back in the pool without a download.
    node.agent.stop()
    node.restart()
    again = await node.run(tasks.FETCH_IMAGE, tasks_pb2.FetchImageRequest(image=source),
                           deadline=40)
    assert again.changed and again.volume.capacity_bytes == len(data)
    assert "image downloaded" not in node.agent.log_path.read_text()


@pytest.fixture
def qemu_uri() -> Iterator[str]:
    with private_libvirtd() as uri:
        yield uri


def fill(path: Path, size: int) -> None:
    """Write `size` bytes of data (not holes) into the file of a raw volume."""
    block = os.urandom(MIB)
    with path.open("r+b") as file:
        for _ in range(size // MIB):
            file.write(block)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_on_qemu_a_copy_redelivered_after_its_agent_was_killed_makes_one_volume(
    agents: agent_harness.AgentLauncher, sender: TaskSender, storage: StorageWorld,
    tmp_path: Path, qemu_uri: str,
) -> None:
    """libvirt keeps copying after the agent dies; the task delivered again waits for the
    copy and finds the snapshot made: one file, complete, in the real pool."""
    node = await start_node(agents, sender, tmp_path / "node", NUBIS_AGENT__LIBVIRT_URI=qemu_uri,
                            NUBIS_AGENT__REDELIVERY_TIMEOUT="1", NUBIS_AGENT__DATAPLANE="recording",
                            NUBIS_AGENT__STORAGE_POOL=f"nubis-{uuid.uuid4().hex[:6]}")
    pool_dir = node.directory / "pool"
    pool = await node.pool()
    disk = os.statvfs(pool_dir)  # libvirt reports the pool's filesystem
    assert pool.capacity_bytes == disk.f_blocks * disk.f_frsize
    source, snapshot = name(), name("snapshot")
    size = 768 * MIB
    made = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=source, capacity_bytes=size, format="raw"))
    assert made.volume.path == str(pool_dir / source)
    fill(pool_dir / source, size)

    pending = asyncio.create_task(node.run(tasks.SNAPSHOT_VOLUME, tasks_pb2.SnapshotVolumeRequest(
        volume_name=source, snapshot_name=snapshot)))
    await wait_until(lambda: (pool_dir / snapshot).exists(), 60)
    node.agent.kill()
    node.restart()
    reply = await pending
    assert not reply.changed  # done by the copy the first delivery started
    assert reply.snapshot.capacity_bytes == size
    assert sorted(p.name for p in pool_dir.iterdir()) == sorted([source, snapshot])
    assert (await node.pool()).volume_count == 2
    assert _digest(pool_dir / snapshot) == _digest(pool_dir / source)

    # A volume made from an image is a qcow2 file backed by the cached image's file.
    data = qcow2_bytes(tmp_path, "32M")
    image = await storage.active_image(data, disk_format=Format.DISK_FORMAT_QCOW2)
    overlay = name()
    reply_overlay = await node.run(tasks.ENSURE_VOLUME, tasks_pb2.EnsureVolumeRequest(
        name=overlay, backing_image=source_of(image.meta.id, data, "qcow2")))
    cached = pool_dir / image_cache.volume_name(image.meta.id)
    assert reply_overlay.volume.backing_path == str(cached)
    assert cached.read_bytes() == data
    for gone in (overlay, cached.name, snapshot, source):
        await node.run(tasks.DELETE_VOLUME, tasks_pb2.DeleteVolumeRequest(name=gone))
    assert list(pool_dir.iterdir()) == []


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(MIB):
            hasher.update(block)
    return hasher.hexdigest()
