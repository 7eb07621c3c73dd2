"""How `nubis server ... --wait` follows servers to a final state: one server with the
SDK's waiter (services.client.sdk.waiters: a read, then WatchInstances from its
revision); several on one WatchInstances for live progress, with GetInstance polls as
the fallback (and as a backstop while the watch runs); a progress line on a terminal
only, and one final line per server always.

A server has settled when it is in a final state (ACTIVE, STOPPED, VERIFY_RESIZE,
ERROR, DELETED) with no operation in flight (task_id ""). ERROR is a failure
naming the server's fault; so is settling in another state than the one asked for
while a fault is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2
from rich.status import Status

from services.client.output import Output
from services.client.sdk import waiters
from services.common import errors

if TYPE_CHECKING:
    from services.client.commands.flavor import Stub

Instance = instance_pb2.Instance
R = instance_requests_pb2
FINAL = frozenset({Instance.ACTIVE, Instance.STOPPED, Instance.VERIFY_RESIZE, Instance.ERROR,
                   Instance.DELETED})
"""States an operation ends in."""
_FINAL_NAMES = tuple(Instance.State.Name(state) for state in sorted(FINAL))
WATCHED_POLL_INTERVAL = 2.0
"""Seconds between GetInstance polls while the watch runs (a backstop for a lost event)."""
POLL_INTERVAL = 0.5
"""Seconds between GetInstance polls when the service has no watch to give."""


def state_word(instance: instance_pb2.Instance) -> str:
    """ACTIVE, BUILDING, ..."""
    return Instance.State.Name(instance.state)


def step_word(instance: instance_pb2.Instance) -> str:
    """The task state as an operator reads it ("spawning"), "" when idle."""
    if instance.task_state == Instance.TASK_STATE_UNSPECIFIED:
        return ""
    return Instance.TaskState.Name(instance.task_state).removeprefix("TASK_STATE_").lower()


def describe(instance: instance_pb2.Instance) -> str:
    """`BUILDING (spawning)`, or `ACTIVE` when idle."""
    step = step_word(instance)
    return f"{state_word(instance)} ({step})" if step else state_word(instance)


def settled(instance: instance_pb2.Instance) -> bool:
    """In a final state with nothing in flight."""
    if instance.state == Instance.DELETED:
        return True
    return instance.state in FINAL and not instance.task_id


def label(instance: instance_pb2.Instance) -> str:
    """`demo (uuid)`, or the id alone for a nameless server."""
    name, server_id = instance.meta.name, instance.meta.id
    return f"{name} ({server_id})" if name else server_id


def fault_text(instance: instance_pb2.Instance) -> str:
    """`message (reason)` of the server's fault, "" without one."""
    fault = instance.fault
    if not (fault.message or fault.reason):
        return ""
    return f"{fault.message} ({fault.reason})" if fault.reason else fault.message


def progress_line(servers: Sequence[instance_pb2.Instance], elapsed: float) -> str:
    """One line for a terminal: the server's state and step, or a count per state and step."""
    if len(servers) == 1:
        return f"server {label(servers[0])}: {describe(servers[0])}  {elapsed:.1f}s"
    counts: dict[str, int] = {}
    for instance in servers:
        counts[describe(instance)] = counts.get(describe(instance), 0) + 1
    done = sum(1 for instance in servers if settled(instance))
    parts = ", ".join(f"{count} {what}" for what, count in sorted(counts.items()))
    return f"{done}/{len(servers)} servers settled: {parts}  {elapsed:.1f}s"


def final_line(instance: instance_pb2.Instance, elapsed: float) -> str:
    """What is printed once a server has settled, whoever reads it."""
    line = f"server {label(instance)}: {state_word(instance)} after {elapsed:.1f}s"
    fault = fault_text(instance)
    return f"{line}: {fault}" if fault and instance.state == Instance.ERROR else line


def failure(instance: instance_pb2.Instance, expected: Collection[int] | None) -> str | None:
    """Why a settled server is a failed outcome; None when it is the one asked for."""
    if instance.state == Instance.ERROR:
        return f"server {label(instance)} went to ERROR: {fault_text(instance) or 'no fault'}"
    if expected is not None and instance.state not in expected and fault_text(instance):
        wanted = " or ".join(Instance.State.Name(s) for s in sorted(expected))  # type: ignore[arg-type]
        return (f"server {label(instance)} is {state_word(instance)}, not {wanted}: "
                f"{fault_text(instance)}")
    return None


def deleted(instance: instance_pb2.Instance) -> instance_pb2.Instance:
    """The server as its last state, marked DELETED."""
    gone = Instance()
    gone.CopyFrom(instance)
    gone.state = Instance.DELETED
    gone.task_state = Instance.TASK_STATE_UNSPECIFIED
    gone.task_id = ""
    return gone


@dataclass
class Follower:
    """The latest view of the servers being waited for, fed by the watch and the polls."""

    stub: Stub
    servers: dict[str, instance_pb2.Instance]
    on_change: Callable[[], None] = lambda: None
    watching: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    settled_at: dict[str, float] = field(default_factory=dict)

    def seen(self, instance: instance_pb2.Instance) -> None:
        server_id = instance.meta.id
        old = self.servers.get(server_id)
        if old is None or server_id in self.settled_at:
            return
        if instance.state != Instance.DELETED and 0 < instance.meta.revision < old.meta.revision:
            return  # an older view than the one held (a poll overtaken by the watch)
        self.servers[server_id] = instance
        if settled(instance):
            self.settled_at[server_id] = time.monotonic()
        self.changed.set()
        self.on_change()

    def pending(self) -> list[str]:
        return [i for i in self.servers if i not in self.settled_at]

    async def watch(self, all_projects: bool) -> None:
        """Every change after the oldest revision held; returns when the service has none."""
        since = min(i.meta.revision for i in self.servers.values())
        stream = self.stub.WatchInstances(R.WatchInstancesRequest(
            options=resource_pb2.WatchOptions(start_revision=since, all_projects=all_projects)))
        try:
            self.watching = True
            async for event in stream:
                if event.type == resource_pb2.EVENT_TYPE_DELETED:
                    self.seen(deleted(event.instance))
                elif event.type != resource_pb2.EVENT_TYPE_SYNCED:
                    self.seen(event.instance)
        except errors.NubisError:
            pass  # no watch (UNIMPLEMENTED, a replica gone, refused): the polls carry on
        finally:
            # A cancelled wait ends the stream too: the SDK cancels its call as it unwinds.
            self.watching = False

    async def poll(self) -> None:
        while True:
            for server_id in self.pending():
                self.seen(await self._get(server_id))
            await asyncio.sleep(WATCHED_POLL_INTERVAL if self.watching else POLL_INTERVAL)

    async def _get(self, server_id: str) -> instance_pb2.Instance:
        try:
            found: instance_pb2.Instance = await self.stub.GetInstance(
                R.GetInstanceRequest(id=server_id))
            return found
        except errors.NotFound:
            return deleted(self.servers[server_id])


async def follow(stub: Stub, started: Sequence[instance_pb2.Instance], out: Output, *,
                 within: float, all_projects: bool = False) -> list[instance_pb2.Instance]:
    """Wait until every server has settled; print progress on a terminal and a final line
    for each; the servers as they ended, in the order given."""
    begun = time.monotonic()
    if len(started) == 1:
        return [await _follow_one(stub, started[0], out, within=within, begun=begun)]
    follower = Follower(stub, {i.meta.id: i for i in started})
    for instance in started:
        follower.seen(instance)  # already settled (an idempotent verb): nothing to wait for
    with _progress(out) as show:
        def redraw() -> None:
            show(progress_line(list(follower.servers.values()), time.monotonic() - begun))
        follower.on_change = redraw
        redraw()
        workers = [asyncio.create_task(follower.watch(all_projects)),
                   asyncio.create_task(follower.poll())]
        try:
            await _until_settled(follower, within, workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    for server_id in follower.servers:
        took = follower.settled_at.get(server_id, time.monotonic()) - begun
        out.note(final_line(follower.servers[server_id], took))
    return [follower.servers[i.meta.id] for i in started]


async def _follow_one(stub: Stub, started: instance_pb2.Instance, out: Output, *,
                      within: float, begun: float) -> instance_pb2.Instance:
    """One server: the SDK's waiter (a read, then WatchInstances from its revision), its
    state drawn on a terminal as each version arrives, then its final line."""
    latest = started

    with _progress(out) as show:
        def seen(instance: instance_pb2.Instance) -> None:
            nonlocal latest
            latest = instance
            show(progress_line([instance], time.monotonic() - begun))

        seen(started)
        try:
            found = await waiters.wait(waiters.INSTANCES, stub, started.meta.id, _FINAL_NAMES,
                                       within=within, seen=seen)
        except waiters.ResourceFailed as exc:  # idle elsewhere with a fault: check() says so
            found = exc.resource
    done: instance_pb2.Instance = deleted(latest) if found is None else found
    out.note(final_line(done, time.monotonic() - begun))
    return done


async def _until_settled(follower: Follower, within: float,
                         workers: Sequence[asyncio.Task[Any]]) -> None:
    deadline = time.monotonic() + within
    while follower.pending():
        for worker in workers:  # a poll that failed (not NOT_FOUND) ends the wait with its error
            if worker.done() and not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()  # type: ignore[misc]
        left = deadline - time.monotonic()
        if left <= 0:
            states = ", ".join(f"{label(follower.servers[i])} {describe(follower.servers[i])}"
                               for i in follower.pending())
            raise errors.Unavailable(f"servers did not settle within {within:.0f}s: {states}",
                                     reason="nubis.cli.wait_timeout")
        follower.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(follower.changed.wait(), min(left, 1.0))


def check(servers: Sequence[instance_pb2.Instance], expected: Collection[int] | None) -> None:
    """Raise naming every server that ended in a failed outcome."""
    problems = [p for p in (failure(i, expected) for i in servers) if p]
    if problems:
        raise errors.FailedPrecondition("; ".join(problems), reason="nubis.cli.operation_failed")


@contextlib.contextmanager
def _progress(out: Output) -> Iterator[Callable[[str], None]]:
    """A live status line on a terminal (stderr's in JSON mode); nothing into a pipe."""
    console = out.err if out.json else out.console
    if not console.is_terminal:
        yield lambda _: None
        return
    with Status("", console=console) as status:
        yield lambda line: status.update(line)
