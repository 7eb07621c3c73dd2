"""Quota administration: per-project limits over the settings' defaults, and usage reports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nubis.identity.v1 import identity_pb2

from services.common import errors, policy
from services.common import quota as shared_quota
from services.common.context import Principal
from services.common.store import Store, Txn
from services.identity import paths, records


async def _require_project(store: Store, principal: Principal, project_id: str) -> str:
    if project_id:
        records.check_id(project_id, "project_id")
    scope = policy.target_project(principal, project_id, "project")
    if await store.find(paths.project(scope), identity_pb2.Project) is None:
        raise errors.NotFound(f"project {scope} not found", metadata={"id": scope})
    return scope


async def get_quota(
    store: Store, principal: Principal, project_id: str, defaults: Mapping[str, int]
) -> identity_pb2.Quota:
    """Every resource's effective limit for the project."""
    scope = await _require_project(store, principal, project_id)
    stored = await store.find(paths.quota_key(scope), identity_pb2.Quota)
    limits = shared_quota.effective_limits(stored.value if stored else None, defaults)
    return identity_pb2.Quota(
        project_id=scope, limits=limits, revision=stored.mod_revision if stored else 0
    )


def _validate(limits: Mapping[str, int], reset: Sequence[str]) -> None:
    violations = errors.ViolationCollector()
    for name, limit in limits.items():
        if name not in shared_quota.RESOURCES:
            violations.add(f"limits.{name}", "not a quota resource")
        elif limit < shared_quota.UNLIMITED:
            violations.add(f"limits.{name}", "must be >= 0, or -1 for unlimited")
    for name in reset:
        if name not in shared_quota.RESOURCES:
            violations.add("reset", f"not a quota resource: {name}")
    if not limits and not reset:
        violations.add("limits", "name at least one limit to change or reset")
    violations.check("invalid quota update")


async def update_quota(
    store: Store, principal: Principal, project_id: str, limits: Mapping[str, int],
    reset: Sequence[str], defaults: Mapping[str, int],
) -> identity_pb2.Quota:
    """Override some limits of a project (lowering below usage is allowed, like Nova)."""
    if not project_id:
        raise errors.InvalidArgument(
            "project_id is required",
            violations=[errors.FieldViolation("project_id", "required")],
        )
    _validate(limits, reset)
    scope = await _require_project(store, principal, project_id)

    async def body(txn: Txn) -> None:
        current = await txn.get(paths.quota_key(scope), identity_pb2.Quota)
        quota = identity_pb2.Quota(project_id=scope)
        if current is not None:
            quota.limits.update(current.value.limits)
        quota.limits.update(limits)
        for name in reset:
            quota.limits.pop(name, None)
        txn.put(paths.quota_key(scope), quota)

    await store.atomic(body)
    return await get_quota(store, principal, scope, defaults)


async def get_usage(store: Store, principal: Principal, project_id: str) -> identity_pb2.Usage:
    """What the project uses now, every resource listed (zero if never used)."""
    scope = await _require_project(store, principal, project_id)
    stored = await store.find(paths.usage_key(scope), identity_pb2.Usage)
    in_use = dict(stored.value.in_use) if stored else {}
    return identity_pb2.Usage(
        project_id=scope,
        in_use={name: in_use.get(name, 0) for name in shared_quota.RESOURCES},
        revision=stored.mod_revision if stored else 0,
    )
