"""Quota administration: per-project limits over the settings' defaults, and usage reports."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

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


def _masked(paths_: list[str], violations: errors.ViolationCollector) -> list[str]:
    """Resource names of the `limits.<resource>` paths; `limits` itself is handled apart."""
    if not paths_:
        violations.add("update_mask", "name `limits` or `limits.<resource>`")
    named: list[str] = []
    for path in paths_:
        name = path.removeprefix("limits.")
        if path == "limits":
            continue
        if name == path or name not in shared_quota.RESOURCES:
            violations.add("update_mask", f"unknown or read-only field: {path}")
        else:
            named.append(name)
    return named


def _changes(request: identity_pb2.UpdateQuotaRequest) -> tuple[dict[str, int], list[str], bool]:
    """(limits to set, limits to reset, replace all) from the mask; INVALID_ARGUMENT if bad.

    As with every field mask, limits the mask does not name are ignored.
    """
    violations = errors.ViolationCollector()
    paths_ = list(request.update_mask.paths)
    named = _masked(paths_, violations)
    replace = "limits" in paths_
    given = dict(request.quota.limits)
    to_set = given if replace else {name: given[name] for name in named if name in given}
    for name, limit in to_set.items():
        if name not in shared_quota.RESOURCES:
            violations.add(f"quota.limits.{name}", "not a quota resource")
        elif limit < shared_quota.UNLIMITED:
            violations.add(f"quota.limits.{name}", "must be >= 0, or -1 for unlimited")
    violations.check("invalid quota update")
    to_reset = [] if replace else [name for name in named if name not in given]
    return to_set, to_reset, replace


async def update_quota(
    store: Store, principal: Principal, request: identity_pb2.UpdateQuotaRequest,
    defaults: Mapping[str, int],
) -> identity_pb2.Quota:
    """Override some limits of a project (lowering below usage is allowed, like Nova)."""
    project_id = request.quota.project_id
    if not project_id:
        raise errors.InvalidArgument(
            "quota.project_id is required",
            violations=[errors.FieldViolation("quota.project_id", "required")],
        )
    changes = _changes(request)
    scope = await _require_project(store, principal, project_id)
    await store.atomic(limits_writer(scope, request.quota.revision, changes))
    return await get_quota(store, principal, scope, defaults)


def limits_writer(
    scope: str, expected_revision: int, changes: tuple[dict[str, int], list[str], bool],
) -> Callable[[Txn], Awaitable[None]]:
    """The transaction body of update_quota: apply `changes` to the project's limits."""
    to_set, to_reset, replace = changes

    async def body(txn: Txn) -> None:
        # Read in the transaction so that a project deleted since the first check
        # fails the commit's compare, rather than leaving its quota key behind.
        if await txn.get(paths.project(scope), identity_pb2.Project) is None:
            raise errors.NotFound(f"project {scope} not found", metadata={"id": scope})
        current = await txn.get(paths.quota_key(scope), identity_pb2.Quota)
        stored_revision = current.mod_revision if current is not None else 0
        if expected_revision and expected_revision != stored_revision:
            raise errors.Conflict(
                "the quota changed since it was read; read it again and retry",
                metadata={"expected_revision": str(expected_revision),
                          "revision": str(stored_revision)},
            )
        quota = identity_pb2.Quota(project_id=scope)
        if current is not None and not replace:
            quota.limits.update(current.value.limits)
        quota.limits.update(to_set)
        for name in to_reset:
            quota.limits.pop(name, None)
        txn.put(paths.quota_key(scope), quota)

    return body


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
