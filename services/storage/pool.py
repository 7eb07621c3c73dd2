"""Storage pools: what each node's agent reports of its libvirt pools, plus the operator's records.

A pool's facts (path, capacity, allocation, available bytes, running) are
what the node's agent read from libvirt and published in its NodeReport; the
scheduler serves them with the node (`clients.scheduler.ListNodes/GetNode`),
so a DOWN node's pools show UNAVAILABLE. A pool's id is derived from its
node and libvirt name (UUIDv5), so a reported pool has the same id however
often it is read. An operator's record (``storage/pools/<id>``) adds a name,
labels, an allocation ratio and the DISABLED state (drain: existing volumes
stay, new ones go elsewhere); CreateStoragePool also makes the agent define
and start a new `dir` pool (EnsurePool).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from nubis.agent.v1 import tasks_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import pool_pb2, storage_service_pb2, volume_pb2

from services.client import peers
from services.common import errors, filtering, pages, requests, resources, tasks
from services.common.store import Store, Txn
from services.common.task_sender import TaskSender
from services.storage import keys

Pool = pool_pb2.StoragePool
_NAMESPACE = uuid.UUID("6f1d3c1e-9a53-4d8e-9c61-2f0b5f6c1a77")
GIB = 1024**3
PAGE_LISTING = "storage-pools"
CREATE_METHOD = resources.method(storage_service_pb2.DESCRIPTOR, "StorageService",
                                 "CreateStoragePool")
NO_NODE = "nubis.storage.no_node"
FILTER_KEYS: dict[str, frozenset[str] | None] = {
    "name": None, "node": None,
    "state": frozenset(filtering.enum_names(Pool.State.DESCRIPTOR)),
    "type": frozenset(filtering.enum_names(Pool.PoolType.DESCRIPTOR)),
}


def pool_id(node: str, libvirt_name: str) -> str:
    """The stable id of the pool `libvirt_name` on `node`."""
    return str(uuid.uuid5(_NAMESPACE, f"{node}/{libvirt_name}"))


@dataclass(frozen=True)
class Placement:
    """Where a new volume goes: a node, its pool and the zone it is in."""

    node: str
    pool_name: str
    pool_id: str
    zone: str


def _view(node: scheduler_pb2.Node, report: scheduler_pb2.StoragePoolReport,
          record: Pool | None, revision: int = 0) -> Pool:
    pool = Pool()
    if record is not None:
        pool.CopyFrom(record)
        pool.meta.revision = revision
    else:
        pool.meta.name = report.name
        pool.allocation_ratio = 1.0
    pool.meta.id = pool_id(node.name, report.name)
    pool.node, pool.libvirt_name, pool.path = node.name, report.name, report.path
    pool.type = Pool.POOL_TYPE_DIR
    pool.capacity_bytes = report.capacity_bytes
    pool.allocation_bytes = report.allocation_bytes
    pool.available_bytes = report.available_bytes
    up = node.state == scheduler_pb2.NODE_STATE_UP and report.active
    if not up:
        pool.state = Pool.UNAVAILABLE
    elif record is None or record.state != Pool.DISABLED:
        pool.state = Pool.ACTIVE
    return pool


async def _all_nodes(clients: peers.ServiceClients) -> list[scheduler_pb2.Node]:
    found: list[scheduler_pb2.Node] = []
    token = ""
    while True:
        page = await clients.scheduler.ListNodes(scheduler_pb2.ListNodesRequest(
            page_size=pages.MAX_PAGE_SIZE, page_token=token))
        found.extend(page.nodes)
        token = page.next_page_token
        if not token:
            return found


async def _records(store: Store) -> dict[str, tuple[Pool, int]]:
    items, _ = await store.list_all(keys.POOLS, Pool)
    return {item.value.meta.id: (item.value, item.mod_revision) for item in items}


def _views(nodes: Iterable[scheduler_pb2.Node],
           records: dict[str, tuple[Pool, int]]) -> list[Pool]:
    seen: dict[str, Pool] = {}
    for node in nodes:
        for report in node.pools:
            record, revision = records.get(pool_id(node.name, report.name), (None, 0))
            view = _view(node, report, record, revision)
            seen[view.meta.id] = view
    for record, revision in records.values():
        if record.meta.id not in seen:  # defined by an operator, not reported (yet)
            shown = Pool()
            shown.CopyFrom(record)
            shown.meta.revision = revision
            shown.state = Pool.UNAVAILABLE if record.state != Pool.DISABLED else Pool.DISABLED
            seen[shown.meta.id] = shown
    return sorted(seen.values(), key=lambda pool: pool.meta.id)


async def _provisioned(store: Store, pools: list[Pool]) -> None:
    volumes, _ = await store.list_all(keys.VOLUMES, volume_pb2.Volume)
    by_pool: dict[str, int] = {}
    for item in volumes:
        by_pool[item.value.pool_id] = by_pool.get(item.value.pool_id, 0) \
            + item.value.size_gb * GIB
    for pool in pools:
        pool.provisioned_bytes = by_pool.get(pool.meta.id, 0)


async def get(store: Store, clients: peers.ServiceClients, pool_id_: str) -> Pool:
    resources.check_id(pool_id_)
    views = _views(await _all_nodes(clients), await _records(store))
    for pool in views:
        if pool.meta.id == pool_id_:
            await _provisioned(store, [pool])
            return pool
    raise errors.NotFound(f"storage pool {pool_id_} not found", metadata={"id": pool_id_})


def _fields(pool: Pool) -> dict[str, str]:
    return {"name": pool.meta.name, "node": pool.node,
            "state": filtering.enum_name(Pool.State.DESCRIPTOR, pool.state),
            "type": filtering.enum_name(Pool.PoolType.DESCRIPTOR, pool.type)}


async def list_pools(store: Store, clients: peers.ServiceClients,
                     request: pool_pb2.ListStoragePoolsRequest) -> tuple[list[Pool], str]:
    size = pages.page_size(request.page_size)
    wanted = filtering.parse(request.filter, FILTER_KEYS)
    views = [pool for pool in _views(await _all_nodes(clients), await _records(store))
             if wanted.matches(_fields(pool), pool.meta.labels)]
    page, token = pages.page_of(views, lambda pool: pool.meta.id, size=size,
                                page_token=request.page_token, listing=PAGE_LISTING,
                                well_formed=resources.is_uuid)
    await _provisioned(store, page)
    return page, token


class NodeList:
    """The scheduler's nodes as one replica last read them, shared by its placements.

    Read again once `max_age` seconds old; callers arriving meanwhile wait for
    that one read. Placing on a view a second old is safe: the agent refuses a
    volume its pool cannot hold, and the volume goes to ERROR saying so.
    """

    def __init__(self, clients: peers.ServiceClients, max_age: float = 1.0) -> None:
        self._clients = clients
        self._max_age = max_age
        self._nodes: list[scheduler_pb2.Node] | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> list[scheduler_pb2.Node]:
        clock = asyncio.get_running_loop()
        async with self._lock:
            if self._nodes is None or clock.time() - self._read_at > self._max_age:
                self._nodes = await _all_nodes(self._clients)
                self._read_at = clock.time()
            return self._nodes


async def place(store: Store, clients: peers.ServiceClients, *, node: str, zone: str,
                pool_id_: str, size_gb: int, nodes: NodeList | None = None) -> Placement:
    """The node and pool a new volume of `size_gb` goes to.

    Given `node` (and maybe `pool_id_`): that node, which must be up and hold
    an active pool. Otherwise an up, enabled node of `zone` ("" = any). Only
    the pool `pool_id_` is a candidate when it is given, else only each node's
    own pool (the one its agent reports as the node's disk; other pools of the
    node, such as libvirt's own `default`, are used only when named). Of the
    candidates' active, not disabled pools with at least `size_gb` free
    the one with the most free bytes wins (ties broken at random, so
    replicas spread). RESOURCE_EXHAUSTED if there is none.
    """
    if node:
        candidates = [await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=node))]
    else:
        every = await nodes.get() if nodes is not None else await _all_nodes(clients)
        candidates = [found for found in every
                      if not found.disabled and (not zone or found.availability_zone == zone)]
    records = await _records(store)
    best: list[tuple[int, Placement]] = []
    for found in candidates:
        if found.state != scheduler_pb2.NODE_STATE_UP:
            continue
        for report in found.pools:
            pid = pool_id(found.name, report.name)
            record = records.get(pid, (None, 0))[0]
            if pid != pool_id_ if pool_id_ else not report.node_pool:
                # Unnamed: the node's own pool, the one its disk capacity counts.
                continue
            if not report.active or (record is not None and record.state == Pool.DISABLED):
                continue
            if not node and report.available_bytes < size_gb * GIB:
                continue
            best.append((report.available_bytes,
                         Placement(found.name, report.name, pid, found.availability_zone)))
    if not best:
        where = f"node {node}" if node else f"zone {zone!r}" if zone else "any node"
        raise errors.ResourceExhausted(
            f"no up node with an active storage pool of {size_gb} GiB free in {where}",
            reason=NO_NODE, metadata={"node": node, "availability_zone": zone})
    top = max(free for free, _ in best)
    return random.choice([chosen for free, chosen in best if free == top])


def _check_new(pool: Pool) -> None:
    problems = errors.ViolationCollector()
    resources.check_name(problems, "storage_pool.meta.name", pool.meta.name)
    resources.check_labels(problems, "storage_pool.meta.labels", dict(pool.meta.labels))
    if not pool.node:
        problems.add("storage_pool.node", "required: the node that holds the pool")
    if not pool.path.startswith("/") or ".." in pool.path.split("/"):
        problems.add("storage_pool.path", "an absolute directory on the node is required")
    if pool.type not in (Pool.POOL_TYPE_UNSPECIFIED, Pool.POOL_TYPE_DIR):
        problems.add("storage_pool.type", "only DIR pools")
    if pool.allocation_ratio < 0:
        problems.add("storage_pool.allocation_ratio", "must not be negative")
    problems.check("invalid storage pool")


async def create(store: Store, clients: peers.ServiceClients, sender: TaskSender,
                 request: pool_pb2.CreateStoragePoolRequest) -> Pool:
    """Define a `dir` pool on a node through its agent (EnsurePool) and record it."""
    wanted = request.storage_pool
    _check_new(wanted)
    libvirt_name = wanted.libvirt_name or f"nubis-{wanted.meta.name}"
    found = await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=wanted.node))
    if found.state != scheduler_pb2.NODE_STATE_UP or not found.pools:
        # An agent that reports no pools does not manage storage (or is not there).
        raise errors.FailedPrecondition(
            f"node {wanted.node} is down or its agent reports no storage pools",
            reason="nubis.storage.node_down", metadata={"node": wanted.node})
    record = Pool(meta=resources.fresh_meta(wanted.meta), node=wanted.node,
                  type=Pool.POOL_TYPE_DIR, path=wanted.path, libvirt_name=libvirt_name,
                  allocation_ratio=wanted.allocation_ratio or 1.0, state=Pool.ACTIVE)
    record.meta.id = pool_id(wanted.node, libvirt_name)
    idempotency = requests.prepare(store, "", CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    if request.validate_only:
        return record
    await sender.send(wanted.node, tasks.ENSURE_POOL,
                      tasks_pb2.EnsurePoolRequest(name=libvirt_name, path=wanted.path),
                      operation_id=tasks.new_operation_id())

    async def body(txn: Txn) -> None:
        if await requests.replayed(txn, idempotency):
            return
        txn.create(keys.pool(record.meta.id), record)
        await requests.remember(txn, idempotency, record.meta.id)

    await store.atomic(body)
    record.meta.revision = (await store.get(keys.pool(record.meta.id), Pool)).mod_revision
    return record


_UPDATABLE = ("name", "description", "labels", "state", "allocation_ratio")


def _check_update(request: pool_pb2.UpdateStoragePoolRequest) -> list[str]:
    paths = resources.check_mask(request.update_mask.paths, _UPDATABLE)
    change = request.storage_pool
    problems = errors.ViolationCollector()
    if "name" in paths:
        resources.check_name(problems, "storage_pool.meta.name", change.meta.name)
    if "labels" in paths:
        resources.check_labels(problems, "storage_pool.meta.labels", dict(change.meta.labels))
    if "state" in paths and change.state not in (Pool.ACTIVE, Pool.DISABLED):
        problems.add("storage_pool.state", "ACTIVE or DISABLED")
    if "allocation_ratio" in paths and change.allocation_ratio <= 0:
        problems.add("storage_pool.allocation_ratio", "must be positive")
    problems.check("invalid storage pool update")
    return paths


def _apply(record: Pool, change: Pool, paths: list[str]) -> None:
    for path in paths:
        if path == "labels":
            record.meta.labels.clear()
            record.meta.labels.update(change.meta.labels)
        elif path in ("name", "description"):
            setattr(record.meta, path, getattr(change.meta, path))
        else:
            setattr(record, path, getattr(change, path))


async def update(store: Store, clients: peers.ServiceClients,
                 request: pool_pb2.UpdateStoragePoolRequest) -> Pool:
    """Rename, relabel, enable/disable or change the ratio of a pool (reported or defined)."""
    change = request.storage_pool
    paths = _check_update(request)
    current = await get(store, clients, change.meta.id)

    async def body(txn: Txn) -> None:
        stored = await txn.get(keys.pool(current.meta.id), Pool)
        if change.meta.revision and (stored is None or
                                     stored.mod_revision != change.meta.revision):
            raise errors.Conflict(f"storage pool {current.meta.id} changed since revision "
                                  f"{change.meta.revision}", reason="nubis.revision_mismatch")
        record = Pool()
        record.CopyFrom(stored.value if stored is not None else current)
        record.meta.revision = 0
        record.provisioned_bytes = 0
        _apply(record, change, paths)
        record.meta.update_time.CopyFrom(resources.now())
        if not record.meta.create_time.seconds:
            record.meta.create_time.CopyFrom(record.meta.update_time)
        txn.put(keys.pool(current.meta.id), record)

    await store.atomic(body)
    return await get(store, clients, current.meta.id)


async def delete(store: Store, clients: peers.ServiceClients,
                 request: pool_pb2.DeleteStoragePoolRequest) -> None:
    """Forget an operator's pool record; refused while volumes live in the pool.

    The libvirt pool stays defined on the node (its directory may hold data
    an operator wants); a reported pool without a record cannot be deleted.
    """
    current = await get(store, clients, request.id)
    stored = await store.find(keys.pool(current.meta.id), Pool)
    if stored is None:
        raise errors.FailedPrecondition(
            f"storage pool {current.meta.id} is the node's own pool, reported by its agent; "
            "disable it instead", reason="nubis.storage.pool_reported",
            metadata={"id": current.meta.id})
    if current.provisioned_bytes:
        raise errors.FailedPrecondition(
            f"storage pool {current.meta.id} still holds volumes",
            reason="nubis.storage.pool_in_use", metadata={"id": current.meta.id})
    await store.delete(keys.pool(current.meta.id),
                       expect_revision=request.revision or stored.mod_revision)
