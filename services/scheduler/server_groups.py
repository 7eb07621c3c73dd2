"""Server groups: instances kept on one node (affinity) or on distinct nodes (anti-affinity).

Hard policies are filters; soft ones only weigh. Membership (consumer -> node)
lives in the group record itself and every claim that adds a member compares
the group's revision, so two racing members of an anti-affinity group can
never land on the same node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, filtering, pages, requests, resources
from services.common.store import Store, Txn
from services.scheduler import keys, validation

Policy = scheduler_pb2.ServerGroupPolicy
_POLICIES = frozenset({Policy.AFFINITY, Policy.ANTI_AFFINITY, Policy.SOFT_AFFINITY,
                       Policy.SOFT_ANTI_AFFINITY})
# Names this listing's page tokens, so another listing's token is refused.
PAGE_LISTING = "server-groups"
CREATE_METHOD = resources.method(scheduler_pb2.DESCRIPTOR, "SchedulerService",
                                 "CreateServerGroup")


def node_counts(
    group: scheduler_pb2.ServerGroup, *, exclude: Iterable[str] = ()
) -> dict[str, int]:
    """Node -> number of members on it, leaving out `exclude` (the consumers being placed)."""
    skip = set(exclude)
    counts: dict[str, int] = {}
    for consumer, node in group.member_nodes.items():
        if consumer not in skip:
            counts[node] = counts.get(node, 0) + 1
    return counts


def allows(group: scheduler_pb2.ServerGroup, placed: Sequence[tuple[str, str]]) -> bool:
    """Does the hard policy allow these (consumer, node) placements on the current members?"""
    existing = node_counts(group, exclude=[consumer for consumer, _ in placed])
    nodes = [node for _, node in placed]
    if group.policy == Policy.ANTI_AFFINITY:
        return len(set(nodes)) == len(nodes) and not set(nodes) & set(existing)
    if group.policy == Policy.AFFINITY:
        return len(set(nodes) | set(existing)) <= 1
    return True


async def fetch(store: Store, group_id: str) -> scheduler_pb2.ServerGroup:
    validation.identifier(group_id, "id", "server group")
    found = await store.find(keys.server_group(group_id), scheduler_pb2.ServerGroup)
    if found is None:
        raise errors.NotFound(f"server group {group_id} not found",
                              metadata={"server_group_id": group_id})
    group = found.value
    group.meta.revision = found.mod_revision
    return group


def _validate(group: scheduler_pb2.ServerGroup) -> None:
    found = errors.ViolationCollector()
    if not group.meta.name or len(group.meta.name) > 255:
        found.add("server_group.meta.name", "a name of 1-255 characters is required")
    if group.policy not in _POLICIES:
        found.add("server_group.policy",
                  "one of AFFINITY, ANTI_AFFINITY, SOFT_AFFINITY, SOFT_ANTI_AFFINITY")
    if group.member_nodes:
        found.add("server_group.member_nodes", "members join by being scheduled, not here")
    found.check("invalid server group")


def _new_group(request: scheduler_pb2.ServerGroup, project_id: str) -> scheduler_pb2.ServerGroup:
    return scheduler_pb2.ServerGroup(policy=request.policy,
                                     meta=resources.fresh_meta(request.meta, project_id))


async def create(
    store: Store, request: scheduler_pb2.CreateServerGroupRequest, project_id: str
) -> scheduler_pb2.ServerGroup:
    """Create the group; with a request_id, a retry returns the group the first call made."""
    _validate(request.server_group)
    idempotency = requests.prepare(store, project_id, CREATE_METHOD, request, request.request_id,
                                   validate_only=request.validate_only)
    group = _new_group(request.server_group, project_id)
    if request.validate_only:
        group.meta.id = ""
        return group

    async def body(txn: Txn) -> str:
        # The key is read (compared absent) and written with the group in one
        # transaction: racing retries cannot both create, and the loser's rerun
        # finds the winner's record.
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        txn.create(keys.server_group(group.meta.id), group)
        await requests.remember(txn, idempotency, group.meta.id)
        return group.meta.id

    return await fetch(store, await store.atomic(body))


def group_filter(text: str, *, admin: bool) -> filtering.Filter:
    """The filter of ListServerGroups; cloud-admins may also filter on project_id."""
    keys_: dict[str, frozenset[str] | None] = {
        "name": None, "policy": frozenset(filtering.enum_names(Policy.DESCRIPTOR))}
    if admin:
        keys_["project_id"] = None
    return filtering.parse(text, keys_)


def _fields(group: scheduler_pb2.ServerGroup) -> dict[str, str]:
    return {"name": group.meta.name, "project_id": group.meta.project_id,
            "policy": filtering.enum_name(Policy.DESCRIPTOR, group.policy)}


async def list_groups(
    store: Store, project_id: str | None, page_size: int, page_token: str,
    wanted: filtering.Filter | None = None,
) -> tuple[list[scheduler_pb2.ServerGroup], str]:
    """Groups of one project (None: all) passing `wanted`, by id; the token carries the last id."""
    size = pages.page_size(page_size)
    items, _ = await store.list_all(keys.SERVER_GROUPS, scheduler_pb2.ServerGroup)
    groups = []
    for item in items:
        group = item.value
        if project_id is not None and group.meta.project_id != project_id:
            continue
        if wanted is not None and not wanted.matches(_fields(group), group.meta.labels):
            continue
        group.meta.revision = item.mod_revision
        groups.append(group)
    # Keys are the prefix and the id, so the store's order is the order of ids.
    return pages.page_of(groups, lambda group: group.meta.id, size=size, page_token=page_token,
                         listing=PAGE_LISTING, well_formed=resources.is_uuid)


async def delete(store: Store, group_id: str, revision: int = 0) -> None:
    """Members keep running; their allocations just stop naming a live group.

    A non-zero `revision` must still be the group's (ABORTED otherwise).
    """
    if revision < 0:
        raise errors.InvalidArgument("revision must not be negative", violations=[
            errors.FieldViolation("revision", "must not be negative")])
    await store.delete(keys.server_group(group_id), expect_revision=revision or None)
