"""Allocations by consumer: read, release, and move (resize / migrate) them.

A move claims the target in the same transaction that appends the target
allocation to the consumer's record; the source allocation stays until the
caller releases it (after the instance really moved), so a failed migration
can roll back by releasing the target instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors
from services.common.store import Store, Txn
from services.scheduler import keys, model, placement, server_groups, validation

MOVE_IN_PROGRESS = "nubis.scheduler.move_in_progress"


async def get(store: Store, consumer_id: str) -> scheduler_pb2.ConsumerAllocations:
    validation.identifier(consumer_id, "consumer_id", "consumer")
    found = await store.find(keys.allocations(consumer_id), scheduler_pb2.ConsumerAllocations)
    if found is None:
        raise errors.NotFound(f"consumer {consumer_id} has no allocations",
                              metadata={"consumer_id": consumer_id})
    found.value.revision = found.mod_revision
    return found.value


async def release(
    store: Store, consumer_id: str, node_name: str = "", *, patience: float
) -> None:
    """Give back the consumer's allocations (only those on `node_name` if given).

    Releases racing on one node (every instance of it deleted at once) lose
    compares to each other: each runs again on the fresh usage for up to
    `patience` seconds, then answers UNAVAILABLE, never ABORTED.
    """
    validation.identifier(consumer_id, "consumer_id", "consumer")
    if node_name:
        validation.node_name(node_name, "node_name")

    async def body(txn: Txn) -> None:
        held = await txn.get(keys.allocations(consumer_id), scheduler_pb2.ConsumerAllocations)
        if held is None:
            raise errors.NotFound(f"consumer {consumer_id} has no allocations",
                                  metadata={"consumer_id": consumer_id})
        record = scheduler_pb2.ConsumerAllocations()
        record.CopyFrom(held.value)
        drop = [a for a in record.allocations if not node_name or a.node_name == node_name]
        keep = [a for a in record.allocations if a not in drop]
        if not drop:
            raise errors.NotFound(f"consumer {consumer_id} has no allocation on {node_name}",
                                  metadata={"consumer_id": consumer_id, "node": node_name})
        for allocation in drop:
            freed = model.amounts(allocation.resources)
            await placement.change_usage(txn, allocation.node_name,
                                         (-freed[0], -freed[1], -freed[2]), -1, None)
        if keep:
            del record.allocations[:]
            record.allocations.extend(keep)
            record.update_time.GetCurrentTime()
            txn.put(keys.allocations(consumer_id), record)
        else:
            txn.delete(keys.allocations(consumer_id))
        if record.server_group_id:
            await _follow_group(txn, record.server_group_id, consumer_id,
                                keep[0].node_name if keep else "")

    deadline = asyncio.get_running_loop().time() + patience
    try:
        await store.atomic(body, deadline=deadline)
    except errors.Conflict:
        raise placement.contention() from None


async def _follow_group(txn: Txn, group_id: str, consumer_id: str, node_name: str) -> None:
    """Keep the group's member map in step: moved to `node_name`, or gone if empty."""
    fresh = await txn.get(keys.server_group(group_id), scheduler_pb2.ServerGroup)
    if fresh is None or consumer_id not in fresh.value.member_nodes:
        return
    group = scheduler_pb2.ServerGroup()
    group.CopyFrom(fresh.value)
    if node_name:
        group.member_nodes[consumer_id] = node_name
    else:
        del group.member_nodes[consumer_id]
    txn.put(keys.server_group(group_id), group)


def _validate_move(request: scheduler_pb2.MoveAllocationsRequest) -> None:
    validation.identifier(request.consumer_id, "consumer_id", "consumer")
    found = errors.ViolationCollector()
    if request.target_node:
        validation.node_name(request.target_node, "target_node")
    if request.HasField("resources"):
        validation.resources(request.resources, "resources", found, require_some=True)
    validation.traits(list(request.spec.required_traits), "spec.required_traits", found)
    validation.traits(list(request.spec.forbidden_traits), "spec.forbidden_traits", found)
    found.check("invalid move request")


async def move(
    places: placement.Placement, request: scheduler_pb2.MoveAllocationsRequest
) -> scheduler_pb2.ConsumerAllocations:
    """Claim the consumer's resources on a target node, keeping the source claim."""
    _validate_move(request)
    consumer = model.ConsumerId(request.consumer_id)
    current = await get(places.store, consumer)
    if len(current.allocations) != 1:
        raise errors.FailedPrecondition(
            f"consumer {consumer} is already moving; release one of its allocations first",
            reason=MOVE_IN_PROGRESS, metadata={"consumer_id": consumer})
    source = current.allocations[0]
    if request.target_node == source.node_name:
        raise errors.InvalidArgument("the target node is the source node", violations=[
            errors.FieldViolation("target_node", "must differ from the current node")])
    want = request.resources if request.HasField("resources") else source.resources
    demand = placement.demand_of(request.spec, want)
    demand = replace(demand, avoid_nodes=demand.avoid_nodes | {source.node_name})
    group = None
    if current.server_group_id:
        group = await _group_or_none(places.store, current.server_group_id)
    views = None
    if request.target_node:
        target = places.cache.view(request.target_node)
        if target is None:
            raise errors.NotFound(f"node {request.target_node} not found",
                                  metadata={"node": request.target_node})
        views = lambda: [places.cache.view(request.target_node) or target]  # noqa: E731

    async def commit(
        txn: Txn, choices: list[placement.Choice], guard: placement.NodeGuard
    ) -> list[placement.UsageRecord]:
        return await _claim_target(txn, choices, current, want, guard)

    await places.decide_and_commit(demand, [consumer], group, commit, views)
    return await get(places.store, consumer)


async def _group_or_none(store: Store, group_id: str) -> scheduler_pb2.ServerGroup | None:
    try:
        return await server_groups.fetch(store, group_id)
    except errors.NotFound:
        return None


async def _claim_target(
    txn: Txn, choices: list[placement.Choice], current: scheduler_pb2.ConsumerAllocations,
    want: scheduler_pb2.Resources, guard: placement.NodeGuard,
) -> list[placement.UsageRecord]:
    consumer, node = choices[0]
    held = await txn.get(keys.allocations(consumer), scheduler_pb2.ConsumerAllocations)
    if held is None or len(held.value.allocations) != 1:
        raise errors.FailedPrecondition(
            f"the allocations of consumer {consumer} changed during the move",
            reason=MOVE_IN_PROGRESS, metadata={"consumer_id": consumer})
    claimed = await guard.claim(txn, node, model.amounts(want), 1)
    record = scheduler_pb2.ConsumerAllocations()
    record.CopyFrom(held.value)
    record.allocations.add(node_name=node.name).resources.CopyFrom(want)
    record.update_time.GetCurrentTime()
    txn.put(keys.allocations(consumer), record)
    if current.server_group_id:
        await placement.join_group(txn, current.server_group_id, choices, required=False)
    return [claimed]
