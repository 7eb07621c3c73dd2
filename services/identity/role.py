"""Role assignments: which user holds which role on which project (or cloud-wide)."""

from __future__ import annotations

from collections.abc import Callable

from nubis.identity.v1 import identity_pb2

from services.common import errors, filtering, pages, policy, resources
from services.common.context import Principal
from services.common.store import Store, Txn
from services.identity import keys, revocation

_VALID = ", ".join(role.value for role in policy.Role)


def _check_role(role_name: str) -> policy.Role:
    try:
        return policy.Role(role_name)
    except ValueError:
        raise errors.InvalidArgument(
            f"unknown role {role_name!r}",
            violations=[errors.FieldViolation("role", f"must be one of: {_VALID}")],
        ) from None


def _scope(principal: Principal, role: policy.Role, project_id: str) -> str:
    """The project of the assignment ("" for cloud-wide roles), checked against the caller."""
    if role in policy.CLOUD_ROLES:
        if project_id:
            raise errors.InvalidArgument(
                f"{role.value} is not tied to a project",
                violations=[errors.FieldViolation("project_id", f"must be empty for {role.value}")],
            )
        if not policy.is_cloud_admin(principal):
            raise errors.PermissionDenied(
                f"only a cloud-admin may manage {role.value}", reason="nubis.policy.denied"
            )
        return ""
    if project_id:
        resources.check_id(project_id, "project_id")
    return policy.target_project(principal, project_id, "project")


async def _require_subjects(txn: Txn, user_id: str, project_id: str) -> None:
    if await txn.get(keys.user(user_id), identity_pb2.User) is None:
        raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
    if project_id and await txn.get(keys.project(project_id), identity_pb2.Project) is None:
        raise errors.NotFound(f"project {project_id} not found", metadata={"id": project_id})


async def grant(
    store: Store, principal: Principal, user_id: str, project_id: str, role_name: str
) -> identity_pb2.RoleAssignment:
    """Give `user_id` the role on the project; granting a held role again is a no-op."""
    resources.check_id(user_id, "user_id")
    role = _check_role(role_name)
    scope = _scope(principal, role, project_id)
    assignment = identity_pb2.RoleAssignment(
        user_id=user_id, project_id=scope, role=role.value, create_time=resources.now()
    )
    key = keys.role(scope, user_id, role.value)

    async def body(txn: Txn) -> identity_pb2.RoleAssignment:
        await _require_subjects(txn, user_id, scope)
        existing = await txn.get(key, identity_pb2.RoleAssignment)
        if existing is not None:
            return existing.value
        txn.put(key, assignment)
        return assignment

    return await store.atomic(body)


async def revoke(
    store: Store, principal: Principal, user_id: str, project_id: str, role_name: str, *,
    token_ttl: int,
) -> None:
    """Take the role away; the user's tokens that carry it are revoked too.

    Those are the user's tokens scoped to that project (as in Keystone), or all
    of the user's tokens for a cloud-wide role: a project admin's revocation
    never reaches the user's work in other projects.
    """
    resources.check_id(user_id, "user_id")
    role = _check_role(role_name)
    scope = _scope(principal, role, project_id)
    key = keys.role(scope, user_id, role.value)

    async def body(txn: Txn) -> None:
        if await txn.get(key, identity_pb2.RoleAssignment) is None:
            raise errors.NotFound(
                f"user {user_id} has no role {role.value} there", metadata={"id": user_id}
            )
        txn.delete(key)
        await revocation.revoke_subject(store, txn, "user", user_id, token_ttl=token_ttl,
                                        project_id=scope)

    await store.atomic(body)


async def roles_of(store: Store, user_id: str, project_id: str) -> set[str]:
    """Roles a token for (user, project) carries: project roles plus cloud-admin."""
    project_roles, _ = await store.list_all(
        keys.role_prefix(project_id, user_id), identity_pb2.RoleAssignment
    )
    cloud_roles, _ = await store.list_all(
        keys.role_prefix("", user_id), identity_pb2.RoleAssignment
    )
    return {item.value.role for item in [*project_roles, *cloud_roles]}


def _assignment_filter(request: identity_pb2.ListRoleAssignmentsRequest) -> filtering.Filter:
    filter_keys: filtering.Keys = {"user_id": None, "role": [r.value for r in policy.Role],
                                   "project_id": None}
    text = request.filter
    if request.user_id:
        resources.check_id(request.user_id, "user_id")
        text = f"{text} user_id={request.user_id}"
    return filtering.parse(text, filter_keys, labels=False)


def _matches(chosen: filtering.Filter, assignment: identity_pb2.RoleAssignment) -> bool:
    return chosen.matches({"user_id": assignment.user_id, "role": assignment.role,
                           "project_id": assignment.project_id})


async def list_assignments(
    store: Store, principal: Principal, request: identity_pb2.ListRoleAssignmentsRequest
) -> tuple[list[identity_pb2.RoleAssignment], str]:
    """Assignments of the caller's (or a named, visible) project, or all for a cloud-admin."""
    size = pages.page_size(request.page_size)
    chosen = _assignment_filter(request)
    if request.all_projects:
        policy.list_scope(principal, all_projects=True)
        prefix = keys.ROLES
    else:
        if request.project_id:
            resources.check_id(request.project_id, "project_id")
        prefix = keys.role_prefix(policy.target_project(principal, request.project_id, "project"))
    found, next_token = await pages.filtered_page(
        store, prefix, identity_pb2.RoleAssignment, lambda item: _matches(chosen, item.value),
        size=size, page_token=request.page_token,
    )
    return [item.value for item in found], next_token


async def project_member_ids(store: Store, project_id: str) -> set[str]:
    """Users holding any role on the project."""
    items, _ = await store.list_all(keys.role_prefix(project_id), identity_pb2.RoleAssignment)
    return {item.value.user_id for item in items}


async def sweep(
    store: Store, prefix: str, stale: Callable[[identity_pb2.RoleAssignment], bool]
) -> None:
    """Delete the assignments under `prefix` that `stale` picks.

    Run after a user or project delete committed: a grant that read the subject
    before that commit may have landed after the delete listed its assignments,
    and no grant can land any more now that the subject is gone.
    """
    items, _ = await store.list_all(prefix, identity_pb2.RoleAssignment)
    stale_keys = [item.key for item in items if stale(item.value)]
    if not stale_keys:
        return

    async def body(txn: Txn) -> None:
        for key in stale_keys:
            txn.delete(key)

    await store.atomic(body)
