"""WatchInstances over a real compute service: every change once and in order, resumable from
a revision, scoped to the caller's project, filtered, DELETED with the last state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V

from services.common.store import Store
from services.compute import keys
from tests.functional.compute.harness import ComputeCloud, cloud
from tests.functional.compute.power_harness import NODES, PowerCloud, quiet_cloud, reason_of

__all__ = ["cloud", "quiet_cloud"]

Instance = instance_pb2.Instance
Event = instance_requests_pb2.InstanceEvent
ADDED, MODIFIED = resource_pb2.EVENT_TYPE_ADDED, resource_pb2.EVENT_TYPE_MODIFIED
DELETED, SYNCED = resource_pb2.EVENT_TYPE_DELETED, resource_pb2.EVENT_TYPE_SYNCED


class Stream:
    """One WatchInstances call, read event by event."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...], *,
                 start_revision: int = 0, initial_state: bool = False,
                 all_projects: bool = False, filter: str = "") -> None:
        request = instance_requests_pb2.WatchInstancesRequest(filter=filter)
        request.options.start_revision = start_revision
        request.options.initial_state = initial_state
        request.options.all_projects = all_projects
        self.call: Any = stub.WatchInstances(request, metadata=metadata)

    @classmethod
    def of(cls, cloud: PowerCloud, caller: str, **options: Any) -> Stream:
        """A stream of `caller` on the power cloud."""
        return cls(cloud.stub(), cloud.as_(caller), **options)

    async def next(self, within: float = 10.0) -> Event:
        event = await asyncio.wait_for(self.call.read(), within)
        assert event is not grpc.aio.EOF, "the stream ended"
        assert isinstance(event, Event)
        return event

    async def synced(self) -> list[Event]:
        """The events up to and with SYNCED."""
        seen = [await self.next()]
        while seen[-1].type != SYNCED:
            seen.append(await self.next())
        return seen

    async def until(self, done: Callable[[Event], bool], within: float = 20.0) -> list[Event]:
        seen: list[Event] = []
        async with asyncio.timeout(within):
            while not seen or not done(seen[-1]):
                seen.append(await self.next(within))
        return seen

    async def quiet(self, within: float = 1.0) -> bool:
        """True if nothing more comes within `within` seconds."""
        try:
            await asyncio.wait_for(self.call.read(), within)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.call.cancel()


def _idle_stopped(event: Event) -> bool:
    return event.instance.state == Instance.STOPPED and not event.instance.task_id


async def _puts(store: Store, instance_id: str, after: int, last: int) -> list[int]:
    """The revisions of every write of the instance's record in (after, last], from etcd."""
    found: list[int] = []
    async with asyncio.timeout(10):
        async for change in store.watch(keys.instance(instance_id), Instance,
                                              start_revision=after + 1):
            found.append(change.mod_revision)
            if change.mod_revision >= last:
                return found
    return found


async def test_every_change_once_in_order_and_a_resume_repeats_nothing(
        quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    stream = Stream.of(cloud, "a_member")
    [synced] = await stream.synced()
    made = await cloud.instance(NODES[0])
    await cloud.stub().StopInstance(V.StopInstanceRequest(id=made.meta.id),
                                    metadata=cloud.as_("a_member"))
    events = await stream.until(_idle_stopped)
    stream.close()
    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions)), "out of order or repeated"
    assert [event.type for event in events] == [ADDED] + [MODIFIED] * (len(events) - 1)
    assert {event.instance.meta.id for event in events} == {made.meta.id}
    # Every write etcd recorded, none missed: the stream is the record's history.
    assert revisions == await _puts(cloud.store, made.meta.id, synced.revision, revisions[-1])
    steps = [(e.instance.state, e.instance.task_state) for e in events]
    assert steps[0] == (Instance.ACTIVE, Instance.TASK_STATE_UNSPECIFIED)
    assert (Instance.ACTIVE, Instance.TASK_STATE_POWERING_OFF) in steps
    assert all(not event.instance.node for event in events), "placement shown to a member"

    resumed = Stream.of(cloud, "a_member", start_revision=events[0].revision)
    [again] = await resumed.synced()
    assert again.revision == events[0].revision
    rest = await resumed.until(_idle_stopped)
    assert [e.revision for e in rest] == revisions[1:]
    assert rest[0].type == MODIFIED  # the instance was known at the resume point
    assert await resumed.quiet()
    resumed.close()


async def test_another_projects_instances_are_never_sent(quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    mine, theirs = Stream.of(cloud, "a_member"), Stream.of(cloud, "b_admin")
    everyone = Stream.of(cloud, "cloud_admin", all_projects=True)
    for stream in (mine, theirs, everyone):
        await stream.synced()
    in_b = await cloud.instance(NODES[0], project_id=cloud.world.project_b)
    in_a = await cloud.instance(NODES[1])
    for made, caller in ((in_b, "b_admin"), (in_a, "a_member")):
        await cloud.stub().StopInstance(V.StopInstanceRequest(id=made.meta.id),
                                        metadata=cloud.as_(caller))
    a_events = await mine.until(_idle_stopped)
    b_events = await theirs.until(_idle_stopped)
    assert {e.instance.meta.id for e in a_events} == {in_a.meta.id}
    assert {e.instance.meta.id for e in b_events} == {in_b.meta.id}
    stopped: set[str] = set()
    while stopped != {in_a.meta.id, in_b.meta.id}:
        event = await everyone.next()
        assert event.instance.node in NODES, "a cloud-admin sees the node"
        if _idle_stopped(event):
            stopped.add(event.instance.meta.id)
    assert await mine.quiet(0.5) and await theirs.quiet(0.5)
    for stream in (mine, theirs, everyone):
        stream.close()


async def test_a_deleted_instance_is_sent_with_its_last_state(quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    made = await cloud.instance(NODES[0])
    after_create = await cloud.store.revision()
    listed = Stream.of(cloud, "a_member", initial_state=True)
    first = await listed.synced()
    assert made.meta.id in {e.instance.meta.id for e in first if e.type == ADDED}
    # Resumed after the create with no listing: the last state still comes with DELETED.
    resumed = Stream.of(cloud, "a_member", start_revision=after_create)
    await resumed.synced()
    await cloud.store.delete(keys.instance(made.meta.id))
    for stream in (listed, resumed):
        [gone] = await stream.until(lambda e: e.type == DELETED)
        assert gone.instance.meta.id == made.meta.id
        assert gone.instance.meta.name == made.meta.name
        assert gone.instance.meta.project_id == cloud.world.project_a
        assert gone.instance.state == Instance.DELETED
        stream.close()


async def test_an_instance_leaving_the_filter_is_sent_as_deleted(
        quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    stream = Stream.of(cloud, "a_member", filter="state=ACTIVE")
    await stream.synced()
    made = await cloud.instance(NODES[0])
    await cloud.stub().StopInstance(V.StopInstanceRequest(id=made.meta.id),
                                    metadata=cloud.as_("a_member"))
    events = await stream.until(lambda e: e.type == DELETED)
    assert events[0].type == ADDED
    assert events[-1].instance.state == Instance.STOPPED
    assert all(e.instance.state == Instance.ACTIVE for e in events[:-1])
    assert await stream.quiet()
    stream.close()


async def test_a_compacted_or_future_start_revision_is_refused(quiet_cloud: PowerCloud) -> None:
    cloud = quiet_cloud
    old = await cloud.store.revision()
    await cloud.instance(NODES[0], spawn=False)
    await cloud.store.compact(await cloud.store.revision())
    stream = Stream.of(cloud, "a_member", start_revision=old)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.synced()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(caught.value) == "nubis.store.compacted"
    ahead = Stream.of(cloud, "a_member", start_revision=await cloud.store.revision() + 1000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ahead.next()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_boot_watched_from_a_revision_shows_every_state_change_in_order(
        cloud: ComputeCloud) -> None:
    """The must-show: a watch from revision R sees each write of a boot once, in order."""
    start = await cloud.base.store.revision()
    stream = Stream(cloud.stub(), cloud.admin, start_revision=start)
    [synced] = await stream.synced()
    assert synced.revision == start
    made = await cloud.create()
    assert (await cloud.wait_final(made.meta.id)).state == Instance.ACTIVE

    def active(event: Event) -> bool:
        return event.instance.state == Instance.ACTIVE and not event.instance.task_id

    events = await stream.until(active, within=60)
    stream.close()
    assert {event.instance.meta.id for event in events} == {made.meta.id}
    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions)), "out of order or repeated"
    assert revisions == await _puts(cloud.base.store, made.meta.id, start, revisions[-1])
    assert [event.type for event in events] == [ADDED] + [MODIFIED] * (len(events) - 1)
    assert events[0].instance.state == Instance.BUILDING
    steps = [event.instance.task_state for event in events]
    boot = [Instance.TASK_STATE_SCHEDULING, Instance.TASK_STATE_NETWORKING,
            Instance.TASK_STATE_BLOCK_DEVICE_MAPPING, Instance.TASK_STATE_SPAWNING]
    firsts = [steps.index(step) for step in boot]
    assert firsts == sorted(firsts), f"boot steps out of order: {steps}"

    middle = len(events) // 2  # a client that lost the stream there resumes from it
    resumed = Stream(cloud.stub(), cloud.admin, start_revision=revisions[middle])
    await resumed.synced()
    rest = await resumed.until(active, within=20)
    resumed.close()
    assert [event.revision for event in rest] == revisions[middle + 1:]
