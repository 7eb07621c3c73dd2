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
    """How to read, watch and judge one kind of resource."""

    word: str
    get: str
    """The Get RPC's name on the service client."""
    watch: str
    """The Watch RPC's name."""
    get_request: Callable[[str], Message]
    watch_request: Callable[[int, bool], Message]
    """(start_revision, all_projects) -> the Watch request."""
    field: str
    """The event's field holding the resource."""
    states: Any
    """The resource's State enum wrapper (Instance.State, ...)."""
    default: str
    error: str
    deleted: str
    busy: Callable[[Any], bool]
    """Whether an operation is still in flight on it."""


def _options(start: int, all_projects: bool) -> resource_pb2.WatchOptions:
    return resource_pb2.WatchOptions(start_revision=start, all_projects=all_projects)


INSTANCES = Kind(
    word="instance", get="GetInstance", watch="WatchInstances",
    get_request=lambda ident: instance_requests_pb2.GetInstanceRequest(id=ident),
    watch_request=lambda start, every: instance_requests_pb2.WatchInstancesRequest(
        options=_options(start, every)),
    field="instance", states=instance_pb2.Instance.State, default="ACTIVE", error="ERROR",
    deleted="DELETED", busy=lambda found: bool(found.task_id))
VOLUMES = Kind(
    word="volume", get="GetVolume", watch="WatchVolumes",
    get_request=lambda ident: volume_pb2.GetVolumeRequest(id=ident),
    watch_request=lambda start, every: volume_pb2.WatchVolumesRequest(
        options=_options(start, every)),
    field="volume", states=volume_pb2.Volume.State, default="AVAILABLE", error="ERROR",
    deleted="DELETED", busy=lambda found: bool(found.task_id))
PORTS = Kind(
    word="port", get="GetPort", watch="WatchPorts",
    get_request=lambda ident: port_pb2.GetPortRequest(id=ident),
    watch_request=lambda start, every: port_pb2.WatchPortsRequest(
        options=_options(start, every)),
    field="port", states=port_pb2.Port.State, default="ACTIVE", error="ERROR",
    deleted="DELETED", busy=lambda found: False)


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

    def __init__(self, kind: Kind, ident: str, wanted: Collection[int]) -> None:
        self.kind, self.ident, self.wanted = kind, ident, wanted
        self.last: Message | None = None

    def done(self, found: Any) -> bool:
        self.last = found
        kind, state = self.kind, int(found.state)
        name = kind.states.Name(state)
        if state in self.wanted and not kind.busy(found):
            return True
        if state == kind.states.Value(kind.deleted):
            raise errors.NotFound(f"{kind.word} {self.ident} was deleted while awaited",
                                  metadata={"id": self.ident})
        reason, message = _fault(found)
        if state == kind.states.Value(kind.error) or (
                (reason or message) and not kind.busy(found) and state not in self.wanted):
            raise ResourceFailed(
                f"{kind.word} {self.ident} is {name}: {message or 'no fault recorded'}"
                + (f" ({reason})" if reason else ""), resource=found, fault_reason=reason)
        return False

    def gone(self) -> bool:
        """The resource is absent (NOT_FOUND, or a DELETED event): fine only if asked for."""
        if self.kind.states.Value(self.kind.deleted) in self.wanted:
            return True
        raise errors.NotFound(f"{self.kind.word} {self.ident} was deleted while awaited",
                              metadata={"id": self.ident})


async def wait(kind: Kind, client: Any, ident: str, states: Sequence[int | str], *,
               within: float) -> Any:
    """The resource `ident` once done (see the module docstring); None when it is gone and
    DELETED was asked for. `within`: seconds before WaitTimeout."""
    judge = _Judge(kind, ident, state_numbers(kind, states))
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
                found = await self.get(self.kind.get_request(self.judge.ident))
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
        request = self.kind.watch_request(revision, self.all_projects)
        async for event in self.watch(request, deadline=max(1.0, self.ends_at - time.monotonic())):
            changed = getattr(event, self.kind.field)
            if event.type == resource_pb2.EVENT_TYPE_SYNCED or changed.meta.id != self.judge.ident:
                continue
            if event.type == resource_pb2.EVENT_TYPE_DELETED and self.judge.gone():
                return _GONE
            if self.judge.done(changed):
                return changed
        raise errors.Unavailable(f"the {self.kind.word} watch ended", reason=TIMED_OUT)
