"""WatchPorts: port changes from an etcd watch, as the caller may see them.

With `initial_state` the current ports come first as ADDED; SYNCED follows
(also without them: the watch is established), then every change. The last
state of each port seen is kept, so a DELETED event carries it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from nubis.common.v1 import resource_pb2
from nubis.network.v1 import port_pb2

from services.common import errors, filtering, resources
from services.common.context import Principal
from services.common.store import Store, WatchEvent
from services.network import keys
from services.network import network as network_module
from services.network.port import Port, in_scope, matches, port_filter, with_revision


def event_type(kind: str, known: bool) -> resource_pb2.EventType.ValueType:
    if kind == "delete":
        return resource_pb2.EVENT_TYPE_DELETED
    return resource_pb2.EVENT_TYPE_MODIFIED if known else resource_pb2.EVENT_TYPE_ADDED


async def watch(store: Store, principal: Principal | None, scope: str | None,
                request: port_pb2.WatchPortsRequest) -> AsyncIterator[port_pb2.PortEvent]:
    """Port changes the caller may see: optionally the current ports first, then SYNCED
    (also sent without them: the watch is established), then every change."""
    wanted = port_filter(request.filter, admin=network_module.is_admin(principal))
    options = request.options
    if options.start_revision < 0:
        raise errors.InvalidArgument("start_revision must not be negative", violations=[
            errors.FieldViolation("options.start_revision", "must not be negative")])
    known: dict[str, Port] = {}
    start = options.start_revision + 1 if options.start_revision else 0
    if options.initial_state or not start:
        items, revision = await store.list_all(keys.PORTS, Port)
        for item in items:
            found = with_revision(item)
            known[found.meta.id] = found
            if options.initial_state and in_scope(principal, scope, found) \
                    and matches(wanted, found):
                yield port_pb2.PortEvent(type=resource_pb2.EVENT_TYPE_ADDED, port=found,
                                         revision=item.mod_revision)
        start = start or revision + 1
    # Always: the watch runs from here (without initial_state there is nothing before it).
    yield port_pb2.PortEvent(type=resource_pb2.EVENT_TYPE_SYNCED, revision=start - 1)
    async for event in store.watch(keys.PORTS, Port, start_revision=start):
        for change in _events(event, known, principal, scope, wanted):
            yield change


def _events(event: WatchEvent[Port], known: dict[str, Port], principal: Principal | None,
            scope: str | None, wanted: filtering.Filter) -> Iterator[port_pb2.PortEvent]:
    port_id = resources.name_of(event.key, keys.PORTS)
    if event.type == "delete":
        last = known.pop(port_id, None) or Port(meta=resource_pb2.ResourceMeta(id=port_id))
        last.state = Port.DELETED
        found = last
    else:
        assert event.value is not None
        found = Port()
        found.CopyFrom(event.value)
        found.meta.revision = event.mod_revision
    was_known = port_id in known
    if event.type == "put":
        known[port_id] = found
    if found.meta.project_id and not in_scope(principal, scope, found):
        return
    if not found.meta.project_id and not network_module.is_admin(principal):
        return
    if matches(wanted, found):
        yield port_pb2.PortEvent(type=event_type(event.type, was_known), port=found,
                                 revision=event.mod_revision)

