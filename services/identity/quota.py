"""Quota administration: per-project limits over the cloud's defaults, and usage reports.

The cloud's defaults are one record in etcd (`keys.QUOTA_DEFAULTS`), made by
bootstrap from the settings if absent and changed by a cloud-admin; no replica
reads its own settings for a limit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from google.protobuf import field_mask_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, policy, resources
from services.common import quota as shared_quota
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.identity import keys


async def _require_project(store: Store, principal: Principal, project_id: str) -> str:
    if project_id:
        resources.check_id(project_id, "project_id")
    scope = policy.target_project(principal, project_id, "project")
    if await store.find(keys.project(scope), identity_pb2.Project) is None:
        raise errors.NotFound(f"project {scope} not found", metadata={"id": scope})
    return scope


class _LimitsUpdate(Protocol):
    """UpdateQuotaRequest and UpdateDefaultQuotaRequest alike."""

    @property
    def quota(self) -> identity_pb2.Quota: ...
    @property
    def update_mask(self) -> field_mask_pb2.FieldMask: ...


async def get_quota(store: Store, principal: Principal, project_id: str) -> identity_pb2.Quota:
    """Every resource's effective limit for the project."""
    scope = await _require_project(store, principal, project_id)

    async def body(txn: Txn) -> identity_pb2.Quota:
        # One snapshot: the override and the defaults as a reservation would see them.
        stored = await txn.get(keys.quota_key(scope), identity_pb2.Quota)
        return identity_pb2.Quota(project_id=scope, limits=await shared_quota.limits_in(txn, scope),
                                  revision=stored.mod_revision if stored else 0)

    return await store.atomic(body)


async def get_defaults(store: Store) -> identity_pb2.Quota:
    """The cloud's default limits, every resource listed; revision 0 if never written."""
    stored = await store.find(keys.QUOTA_DEFAULTS, identity_pb2.Quota)
    return identity_pb2.Quota(
        limits=shared_quota.default_limits(stored.value if stored else None),
        revision=stored.mod_revision if stored else 0,
    )


async def ensure_defaults(store: Store, seed: Mapping[str, int]) -> bool:
    """Write the cloud's defaults from `seed` (the settings) unless some exist; True if written."""
    violations = errors.ViolationCollector()
    _check_limits(violations, "quota.defaults", seed)
    violations.check("invalid quota defaults in the settings")

    async def body(txn: Txn) -> bool:
        if await txn.get(keys.QUOTA_DEFAULTS, identity_pb2.Quota) is not None:
            return False
        txn.create(keys.QUOTA_DEFAULTS, identity_pb2.Quota(limits=dict(seed)))
        return True

    return await store.atomic(body)


async def update_defaults(
    store: Store, request: identity_pb2.UpdateDefaultQuotaRequest
) -> identity_pb2.Quota:
    """Change some of the cloud's defaults (cloud-admin; the policy table checks it)."""
    if request.quota.project_id:
        raise errors.InvalidArgument(
            "the defaults belong to no project",
            violations=[errors.FieldViolation("quota.project_id", "must be empty")],
        )
    changes = _changes(request)

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.QUOTA_DEFAULTS, identity_pb2.Quota)
        updated = _updated(current, request.quota.revision, changes, "the defaults")
        txn.put(keys.QUOTA_DEFAULTS, updated)

    await store.atomic(body)
    return await get_defaults(store)


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


def _check_limits(violations: errors.ViolationCollector, field: str,
                  limits: Mapping[str, int]) -> None:
    """Note each of `limits` that is not a resource's valid limit, as `<field>.<resource>`."""
    for name, limit in limits.items():
        if name not in shared_quota.RESOURCES:
            violations.add(f"{field}.{name}", "not a quota resource")
        elif limit < shared_quota.UNLIMITED:
            violations.add(f"{field}.{name}", "must be >= 0, or -1 for unlimited")


def _changes(request: _LimitsUpdate) -> tuple[dict[str, int], list[str], bool]:
    """(limits to set, limits to reset, replace all) from the mask; INVALID_ARGUMENT if bad.

    As with every field mask, limits the mask does not name are ignored.
    """
    violations = errors.ViolationCollector()
    paths_ = list(request.update_mask.paths)
    named = _masked(paths_, violations)
    replace = "limits" in paths_
    given = dict(request.quota.limits)
    to_set = given if replace else {name: given[name] for name in named if name in given}
    _check_limits(violations, "quota.limits", to_set)
    violations.check("invalid quota update")
    to_reset = [] if replace else [name for name in named if name not in given]
    return to_set, to_reset, replace


def _updated(
    current: Versioned[identity_pb2.Quota] | None, expected_revision: int,
    changes: tuple[dict[str, int], list[str], bool], what: str,
) -> identity_pb2.Quota:
    """The stored limits with `changes` applied; ABORTED if they moved past `expected_revision`."""
    to_set, to_reset, replace = changes
    stored_revision = current.mod_revision if current is not None else 0
    if expected_revision and expected_revision != stored_revision:
        raise errors.Conflict(
            f"{what} changed since it was read; read it again and retry",
            metadata={"expected_revision": str(expected_revision),
                      "revision": str(stored_revision)},
        )
    quota = identity_pb2.Quota(project_id=current.value.project_id if current else "")
    if current is not None and not replace:
        quota.limits.update(current.value.limits)
    quota.limits.update(to_set)
    for name in to_reset:
        quota.limits.pop(name, None)
    return quota


async def update_quota(
    store: Store, principal: Principal, request: identity_pb2.UpdateQuotaRequest,
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
    return await get_quota(store, principal, scope)


def limits_writer(
    scope: str, expected_revision: int, changes: tuple[dict[str, int], list[str], bool],
) -> Callable[[Txn], Awaitable[None]]:
    """The transaction body of update_quota: apply `changes` to the project's limits."""

    async def body(txn: Txn) -> None:
        # Read in the transaction so that a project deleted since the first check
        # fails the commit's compare, rather than leaving its quota key behind.
        if await txn.get(keys.project(scope), identity_pb2.Project) is None:
            raise errors.NotFound(f"project {scope} not found", metadata={"id": scope})
        current = await txn.get(keys.quota_key(scope), identity_pb2.Quota)
        quota = _updated(current, expected_revision, changes, "the quota")
        quota.project_id = scope
        txn.put(keys.quota_key(scope), quota)

    return body


async def get_usage(store: Store, principal: Principal, project_id: str) -> identity_pb2.Usage:
    """What the project uses now, every resource listed (zero if never used)."""
    scope = await _require_project(store, principal, project_id)
    in_use, revision = await shared_quota.in_use(store, scope)
    return identity_pb2.Usage(
        project_id=scope,
        in_use={name: in_use.get(name, 0) for name in shared_quota.RESOURCES},
        revision=revision,
    )
