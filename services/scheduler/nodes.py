"""Nodes: what agents report, what operators set, and how the API shows both.

A node appears when its agent first writes ``nodes/<name>``; the scheduler
then records it under ``placement/nodes/<name>`` (with a copy of the report),
so it stays listed, DOWN, when the agent's lease lapses, and keeps its id and
operator settings when the agent comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

import structlog
from google.protobuf import field_mask_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, filtering, pages, resources
from services.common.store import Store
from services.scheduler import cache as cache_module
from services.scheduler import keys, model, ratios, validation

log = structlog.get_logger(__name__)

# Names this listing's page tokens, so another listing's token is refused.
PAGE_LISTING = "nodes"
_RATIO_FIELDS: dict[str, Literal["cpu", "ram", "disk"]] = {
    "allocation_ratios.cpu": "cpu",
    "allocation_ratios.ram": "ram",
    "allocation_ratios.disk": "disk",
}
_RATIO_PATHS = set(_RATIO_FIELDS)
_PATHS = {"disabled", "disabled_reason", "allocation_ratios", "reserved", "traits",
          "availability_zone"} | _RATIO_PATHS


def to_node(view: model.NodeView, defaults: scheduler_pb2.AllocationRatios) -> (
    scheduler_pb2.Node
):
    """The API view of a node, its unset ratios taken from the cloud's `defaults`."""
    report = view.last_report
    settings = view.settings or scheduler_pb2.NodeSettings()
    free = view.free
    return scheduler_pb2.Node(
        name=view.name,
        id=settings.id,
        state=scheduler_pb2.NODE_STATE_UP if view.up else scheduler_pb2.NODE_STATE_DOWN,
        disabled=not view.enabled,
        disabled_reason=settings.disabled_reason,
        capacity=report.capacity,
        reserved=settings.reserved,
        allocation_ratios=model.effective_ratios(view.settings, defaults),
        used=model.to_resources(view.used),
        free=model.to_resources(free),
        traits=sorted(view.traits),
        availability_zone=view.availability_zone,
        hypervisor_type=view.hypervisor_type,
        version=report.version,
        queue=report.queue,
        allocation_count=view.allocation_count,
        generation=view.usage_revision,
        tunnel_address=report.tunnel_address,
        dataplane=report.dataplane,
        network_node=report.network_node,
        pools=report.pools,
        port_filter=report.port_filter,
    )


_STATES = {True: "UP", False: "DOWN"}
NODE_FILTER_KEYS: dict[str, frozenset[str] | None] = {
    "name": None, "state": frozenset(_STATES.values()),
    "disabled": frozenset({"true", "false"}), "availability_zone": None,
    "hypervisor_type": None, "trait": None,
    "network_node": frozenset({"true", "false"}), "dataplane": None,
}


def _node_matcher(text: str) -> Callable[[model.NodeView], bool]:
    """Parse ListNodes' filter into a test on one node (INVALID_ARGUMENT if bad)."""
    wanted = filtering.parse(text, NODE_FILTER_KEYS, labels=False)
    # A node has many traits: `trait=A,B` keeps nodes with any of them.
    traits = wanted.values("trait")
    plain = filtering.Filter(tuple(term for term in wanted.terms if term.key != "trait"))

    def matches(view: model.NodeView) -> bool:
        if traits is not None and not traits & view.traits:
            return False
        return plain.matches({
            "name": view.name, "state": _STATES[view.up],
            "disabled": "false" if view.enabled else "true",
            "availability_zone": view.availability_zone,
            "hypervisor_type": view.hypervisor_type,
            "network_node": "true" if view.last_report.network_node else "false",
            "dataplane": view.last_report.dataplane,
        })

    return matches


def list_nodes(
    cache: cache_module.NodeCache, page_size: int, page_token: str, filter_text: str = "",
) -> tuple[list[scheduler_pb2.Node], str]:
    """Nodes passing the filter, by name; the page token carries the last name returned."""
    size = pages.page_size(page_size)
    matches = _node_matcher(filter_text)
    views = sorted((view for view in cache.views() if matches(view)), key=lambda view: view.name)
    page, token = pages.page_of(views, lambda view: view.name, size=size, page_token=page_token,
                                listing=PAGE_LISTING, well_formed=validation.is_node_name)
    defaults = cache.default_ratios()
    return [to_node(view, defaults) for view in page], token


def get_node(cache: cache_module.NodeCache, name: str) -> scheduler_pb2.Node:
    validation.node_name(name)
    view = cache.view(name)
    if view is None:
        raise errors.NotFound(f"node {name} not found", metadata={"node": name})
    return to_node(view, cache.default_ratios())


def _validate_update(
    settings: scheduler_pb2.NodeSettings, mask: field_mask_pb2.FieldMask
) -> list[str]:
    found = errors.ViolationCollector()
    paths = list(mask.paths)
    if not paths:
        found.add("update_mask", "name at least one field to change")
    for path in paths:
        if path not in _PATHS:
            found.add("update_mask", f"unknown or read-only field {path!r}")
    ratios.check(settings.allocation_ratios, "settings.allocation_ratios", found)
    validation.resources(settings.reserved, "settings.reserved", found, require_some=False)
    validation.traits(list(settings.traits), "settings.traits", found)
    if len(settings.disabled_reason) > 255:
        found.add("settings.disabled_reason", "at most 255 characters")
    found.check("invalid node update")
    return paths


def _apply(
    current: scheduler_pb2.NodeSettings, change: scheduler_pb2.NodeSettings, paths: list[str]
) -> scheduler_pb2.NodeSettings:
    for path in paths:
        if path in _RATIO_PATHS:
            field = _RATIO_FIELDS[path]
            if change.allocation_ratios.HasField(field):
                setattr(current.allocation_ratios, field, getattr(change.allocation_ratios, field))
            else:
                current.allocation_ratios.ClearField(field)  # back to the default
        elif path in ("allocation_ratios", "reserved"):
            getattr(current, path).CopyFrom(getattr(change, path))
        elif path == "traits":
            del current.traits[:]
            current.traits.extend(sorted(set(change.traits)))
        else:
            setattr(current, path, getattr(change, path))
    if "disabled" in paths and not current.disabled and "disabled_reason" not in paths:
        current.disabled_reason = ""
    current.update_time.GetCurrentTime()
    return current


def _check_reserved(
    reserved: scheduler_pb2.Resources, capacity: scheduler_pb2.Resources
) -> None:
    """Reserved above the node's reported capacity is INVALID_ARGUMENT (as in Placement)."""
    found = errors.ViolationCollector()
    for field in model.RESOURCE_CLASSES:
        held, wanted = getattr(capacity, field), getattr(reserved, field)
        if wanted > held:
            found.add(f"settings.reserved.{field}",
                      f"{wanted} is more than the node's capacity of {held}")
    found.check("reserved exceeds the node's capacity")


async def update_node(
    store: Store, cache: cache_module.NodeCache, request: scheduler_pb2.UpdateNodeRequest,
) -> scheduler_pb2.Node:
    """Apply the operator's masked changes to the node's settings record."""
    name = validation.node_name(request.name)
    paths = _validate_update(request.settings, request.update_mask)
    view = cache.view(name)
    if view is None:
        raise errors.NotFound(f"node {name} not found", metadata={"node": name})
    if "reserved" in paths:
        _check_reserved(request.settings.reserved, view.last_report.capacity)
    await ensure_registered(store, cache, name)
    updated = await store.update(
        keys.node_settings(name), scheduler_pb2.NodeSettings,
        lambda current: _apply(current, request.settings, paths),
    )
    cache.observe_settings(updated)
    return get_node(cache, name)


def _new_settings(report: scheduler_pb2.NodeReport) -> scheduler_pb2.NodeSettings:
    now = resources.now()
    return scheduler_pb2.NodeSettings(
        name=report.name, id=resources.new_id(), last_report=report,
        create_time=now, update_time=now,
    )


async def ensure_registered(store: Store, cache: cache_module.NodeCache, name: str) -> None:
    """Create the node's settings record, or refresh its copy of the report."""
    report = cache.report(name)
    held = cache.settings(name)
    if report is None:
        return
    if held is None:
        with contextlib.suppress(errors.AlreadyExists):
            cache.observe_settings(await store.create(keys.node_settings(name),
                                                      _new_settings(report)))
        return
    if held[0].last_report == report:
        return

    def remember(current: scheduler_pb2.NodeSettings) -> scheduler_pb2.NodeSettings:
        current.last_report.CopyFrom(report)
        return current

    cache.observe_settings(await store.update(keys.node_settings(name),
                                              scheduler_pb2.NodeSettings, remember))


async def register_nodes(store: Store, cache: cache_module.NodeCache) -> None:
    """Background loop: record every node whose report appears or changes."""
    pending: asyncio.Queue[str] = asyncio.Queue()
    cache.on_report.append(pending.put_nowait)
    await cache.synced.wait()
    for view in cache.views():
        pending.put_nowait(view.name)
    while True:
        name = await pending.get()
        try:
            await ensure_registered(store, cache, name)
        except errors.NubisError as exc:
            log.warning("could not record node", node=name, error=str(exc))
