"""Waiting for a resource to reach a state, on the service's Watch stream (never by polling).

A wait reads the resource once (Get), and if it is not there yet, watches
from the revision it read, so a change made between the two is never missed,
and returns the first version that is done. A stream that breaks (a replica
restarting) is opened again from the last revision seen. An ERROR state, or
settling elsewhere with a fault, raises ResourceFailed naming the fault; a
deletion raises NotFound unless DELETED was asked for; the time limit raises
WaitTimeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2
from nubis.network.v1 import port_pb2
from nubis.storage.v1 import volume_pb2

from services.common import errors

FAILED = "nubis.client.resource_failed"
TIMED_OUT = "nubis.client.wait_timeout"


class ResourceFailed(errors.FailedPrecondition):
    """The resource went to ERROR (or settled elsewhere with a fault) while it was awaited.

    `resource` is its last version; `fault_reason` the reason its fault records.
    """

    reason = FAILED

    def __init__(self, message: str, *, resource: Message, fault_reason: str) -> None:
        super().__init__(message, reason=FAILED,
                         metadata={"fault_reason": fault_reason} if fault_reason else None)
        self.resource = resource
        self.fault_reason = fault_reason


class WaitTimeout(errors.Unavailable):
    """The resource did not reach the state asked for in time; `resource` is its last version."""

    reason = TIMED_OUT
    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, *, resource: Message | None) -> None:
        super().__init__(message, reason=TIMED_OUT)
        self.resource = resource


@dataclass(frozen=True)
class Kind:
    """How to read, watch and judge one kind of resource (Instance, Volume, Port): its
    Get<Name> and Watch<Name>s RPCs, its State enum, the event field named after it."""

    resource: Any
    """The resource's message class; its State enum has ERROR and DELETED."""
    get_request: Any
    watch_request: Any
    default: str
    """The state waited for when none is named."""
    tracks_tasks: bool
    """Whether its `task_id` says an operation is still in flight on it."""

    @property
    def word(self) -> str:
        return str(self.resource.__name__).lower()

    @property
    def get(self) -> str:
        return f"Get{self.resource.__name__}"

    @property
    def watch(self) -> str:
        return f"Watch{self.resource.__name__}s"

    @property
    def field(self) -> str:
        return self.word

    @property
    def states(self) -> Any:
        return self.resource.State

    def busy(self, found: Any) -> bool:
        return self.tracks_tasks and bool(found.task_id)

    def get_of(self, ident: str) -> Message:
        return self.get_request(id=ident)  # type: ignore[no-any-return]

    def watch_from(self, start: int, all_projects: bool) -> Message:
        return self.watch_request(  # type: ignore[no-any-return]
            options=resource_pb2.WatchOptions(start_revision=start, all_projects=all_projects))


ERROR, DELETED = "ERROR", "DELETED"
INSTANCES = Kind(instance_pb2.Instance, instance_requests_pb2.GetInstanceRequest,
                 instance_requests_pb2.WatchInstancesRequest, "ACTIVE", tracks_tasks=True)
VOLUMES = Kind(volume_pb2.Volume, volume_pb2.GetVolumeRequest, volume_pb2.WatchVolumesRequest,
               "AVAILABLE", tracks_tasks=True)
PORTS = Kind(port_pb2.Port, port_pb2.GetPortRequest, port_pb2.WatchPortsRequest, "ACTIVE",
             tracks_tasks=False)


def state_numbers(kind: Kind, states: Sequence[int | str]) -> frozenset[int]:
    """The State numbers asked for (names like "ACTIVE" or enum values; none: the default)."""
    wanted: set[int] = set()
    for state in states or (kind.default,):
        if isinstance(state, str):
            try:
                wanted.add(int(kind.states.Value(state.upper())))
            except ValueError:
                known = ", ".join(n for n in kind.states.keys()  # noqa: SIM118 - an enum wrapper
                                  if n != "STATE_UNSPECIFIED")
                raise errors.InvalidArgument(
                    f"no {kind.word} state {state!r}", violations=[errors.FieldViolation(
                        "states", f"one of {known}")]) from None
        else:
            wanted.add(int(state))
    return frozenset(wanted)


def _fault(found: Any) -> tuple[str, str]:
    fault = found.fault
    return fault.reason, fault.message


class _Judge:
    """Says whether one version of the awaited resource ends the wait."""

    def __init__(self, kind: Kind, ident: str, wanted: Collection[int],
                 seen: Callable[[Any], None]) -> None:
        self.kind, self.ident, self.wanted, self.seen = kind, ident, wanted, seen
        self.last: Message | None = None

    def done(self, found: Any) -> bool:
        self.last = found
        self.seen(found)
        kind, state = self.kind, int(found.state)
        name = kind.states.Name(state)
        if state in self.wanted and not kind.busy(found):
            return True
        if state == kind.states.Value(DELETED):
            raise errors.NotFound(f"{kind.word} {self.ident} was deleted while awaited",
                                  metadata={"id": self.ident})
        reason, message = _fault(found)
        if state == kind.states.Value(ERROR) or (
                (reason or message) and not kind.busy(found) and state not in self.wanted):
            raise ResourceFailed(
                f"{kind.word} {self.ident} is {name}: {message or 'no fault recorded'}"
                + (f" ({reason})" if reason else ""), resource=found, fault_reason=reason)
        return False

    def gone(self) -> bool:
        """The resource is absent (NOT_FOUND, or a DELETED event): fine only if asked for."""
        if self.kind.states.Value(DELETED) in self.wanted:
            return True
        raise errors.NotFound(f"{self.kind.word} {self.ident} was deleted while awaited",
                              metadata={"id": self.ident})


async def wait(kind: Kind, client: Any, ident: str, states: Sequence[int | str], *,
               within: float, seen: Callable[[Any], None] = lambda _: None) -> Any:
    """The resource `ident` once done (see the module docstring); None when it is gone and
    DELETED was asked for. `within`: seconds before WaitTimeout. `seen` is called with
    each version read or watched (the CLI's progress line)."""
    judge = _Judge(kind, ident, state_numbers(kind, states), seen)
    follower = _Follower(kind, client, judge, time.monotonic() + within)
    try:
        async with asyncio.timeout(within):
            return await follower.run()
    except TimeoutError:
        last: Any = judge.last
        where = f" (last {kind.states.Name(last.state)})" if last is not None else ""
        wanted = "/".join(kind.states.Name(state) for state in sorted(judge.wanted))
        raise WaitTimeout(f"{kind.word} {ident} did not reach {wanted} within {within:g}s"
                          f"{where}", resource=last) from None


_GONE = object()


class _Follower:
    """Reads the resource, then follows its Watch until the judge says it is done."""

    def __init__(self, kind: Kind, client: Any, judge: _Judge, ends_at: float) -> None:
        self.kind, self.judge, self.ends_at = kind, judge, ends_at
        self.get, self.watch = getattr(client, kind.get), getattr(client, kind.watch)
        self.all_projects = True

    async def run(self) -> Any:
        while True:
            try:
                found = await self.get(self.kind.get_of(self.judge.ident))
            except errors.NotFound:
                self.judge.gone()  # raises unless DELETED was asked for
                return None
            if self.judge.done(found):
                return found
            try:
                result = await self._follow(found.meta.revision)
            except errors.PermissionDenied:
                if not self.all_projects:
                    raise
                self.all_projects = False  # not a cloud admin: its own project is all it sees
                continue
            except errors.Unavailable:
                await asyncio.sleep(0.2)  # a replica went away: read again, watch again
                continue
            return None if result is _GONE else result

    async def _follow(self, revision: int) -> Any:
        """The first change after `revision` that ends the wait (_GONE: deleted, as asked)."""
        request = self.kind.watch_from(revision, self.all_projects)
        async for event in self.watch(request, deadline=max(1.0, self.ends_at - time.monotonic())):
            changed = getattr(event, self.kind.field)
            if event.type == resource_pb2.EVENT_TYPE_SYNCED or changed.meta.id != self.judge.ident:
                continue
            if event.type == resource_pb2.EVENT_TYPE_DELETED and self.judge.gone():
                return _GONE
            if self.judge.done(changed):
                return changed
        raise errors.Unavailable(f"the {self.kind.word} watch ended", reason=TIMED_OUT)
