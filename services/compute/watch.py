"""WatchInstances: instance changes from an etcd watch, as the caller may see them.

The stream is: with `initial_state`, the instances as they were at the start
(ADDED each), then SYNCED (always: the watch is established; its revision
is where the stream stands), then every change in commit order, each once.
The start is `options.start_revision` when given (the stream resumes after
it: what a client saw last), else now. Each change is sent as ADDED (the
instance was not in the caller's view), MODIFIED or DELETED; an instance
that stops matching the filter is sent as DELETED too (it leaves the view),
one that starts matching as ADDED. A DELETED event carries the instance's
last state, with state DELETED.

The caller sees its own project's instances, or every project's with
`all_projects` (cloud-admin only), each through `instance.shown` (no node
or domain name unless cloud-admin or service, never user_data). A start
revision etcd has compacted away fails the stream with FAILED_PRECONDITION
`nubis.store.compacted` (as every nubis watch does): list again, then watch
from the listing's revision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2

from services.common import errors, pages, policy
from services.common.context import Principal
from services.common.store import COMPACTED, Store, Versioned, WatchEvent
from services.common.store import keys as store_keys
from services.compute import instance as instance_module
from services.compute import keys

Instance = instance_pb2.Instance
Event = instance_requests_pb2.InstanceEvent


class _View:
    """What one stream may show: the project scope, the filter and the caller."""

    def __init__(self, principal: Principal, scope: str | None, text: str) -> None:
        self.principal = principal
        self.scope = scope
        self._keep = instance_module.matcher(
            scope, text, admin=instance_module.sees_everything(principal))

    def covers(self, instance: Instance) -> bool:
        """In the caller's scope (an instance never changes project)."""
        return self.scope is None or instance.meta.project_id == self.scope

    def keeps(self, key: str, instance: Instance, revision: int) -> bool:
        return self._keep(Versioned(key, instance, revision, 0))

    def event(self, kind: resource_pb2.EventType.ValueType, instance: Instance,
              revision: int) -> Event:
        return Event(type=kind, instance=instance_module.shown(instance, self.principal),
                     revision=revision)


async def _state_at(store: Store, revision: int,
                    view: _View) -> dict[str, tuple[Instance, int]]:
    """Every instance of the view's scope as it was at `revision`, with its mod revision."""
    full = (store.root + "/" + keys.INSTANCES).encode()
    # A cursor placed before the first key makes the first page read at `revision`.
    token = store_keys.encode_page_token(revision, full)
    found: dict[str, tuple[Instance, int]] = {}
    while True:
        page = await store.list(keys.INSTANCES, Instance, page_size=pages.MAX_PAGE_SIZE,
                                page_token=token)
        if page.revision != revision:  # the store read the latest instead: `revision` is gone
            raise errors.FailedPrecondition(
                f"cannot watch instances from revision {revision}: that history was "
                "compacted; list again", reason=COMPACTED, metadata={"revision": str(revision)})
        for item in page.items:
            if not view.covers(item.value):
                continue
            item.value.meta.revision = item.mod_revision
            found[item.key] = (item.value, item.mod_revision)
        token = page.next_page_token
        if not token:
            return found


async def watch(store: Store, principal: Principal,
                request: instance_requests_pb2.WatchInstancesRequest) -> AsyncIterator[Event]:
    """The caller's instance changes: optionally the instances first, SYNCED, every change."""
    options = request.options
    scope = policy.list_scope(principal, all_projects=options.all_projects)
    view = _View(principal, scope, request.filter)
    if options.start_revision < 0:
        raise errors.InvalidArgument("start_revision must not be negative", violations=[
            errors.FieldViolation("options.start_revision", "must not be negative")])
    now = await store.revision()
    if options.start_revision > now:
        raise errors.InvalidArgument(
            f"start_revision {options.start_revision} is ahead of the store (at {now})",
            violations=[errors.FieldViolation("options.start_revision",
                                              "must be a revision a watch event gave")])
    start = options.start_revision or now
    # Last states at the start: a DELETED (and the choice of ADDED or MODIFIED)
    # needs them even for instances the stream does not list.
    known = await _state_at(store, start, view)
    shown = {key for key, (value, revision) in known.items()
             if view.keeps(key, value, revision)}
    if options.initial_state:
        for key in sorted(shown):
            value, revision = known[key]
            yield view.event(resource_pb2.EVENT_TYPE_ADDED, value, revision)
    yield Event(type=resource_pb2.EVENT_TYPE_SYNCED, revision=start)
    async for change in store.watch(keys.INSTANCES, Instance, start_revision=start + 1):
        for event in _events(change, known, shown, view):
            yield event


def _events(change: WatchEvent[Instance], known: dict[str, tuple[Instance, int]],
            shown: set[str], view: _View) -> Iterator[Event]:
    """The event (at most one) a store change makes in the caller's view."""
    was_shown = change.key in shown
    if change.value is not None and not view.covers(change.value):
        return
    if change.value is None:
        last = known.pop(change.key, None)
        shown.discard(change.key)
        if last is not None and was_shown:
            gone = last[0]
            gone.state = Instance.DELETED
            yield view.event(resource_pb2.EVENT_TYPE_DELETED, gone, change.mod_revision)
        return
    instance = change.value
    instance.meta.revision = change.mod_revision
    known[change.key] = (instance, change.mod_revision)
    if view.keeps(change.key, instance, change.mod_revision):
        shown.add(change.key)
        kind = resource_pb2.EVENT_TYPE_MODIFIED if was_shown else resource_pb2.EVENT_TYPE_ADDED
        yield view.event(kind, instance, change.mod_revision)
    elif was_shown:
        # It left the view (another state than the filter's, say): the caller drops it.
        shown.discard(change.key)
        yield view.event(resource_pb2.EVENT_TYPE_DELETED, instance, change.mod_revision)
