"""Authorization as data: each service's table maps an RPC to the role and scope it needs.

Every service declares one `PolicyTable` in ``services/<svc>/policy.py``; the
auth hook of the server bootstrap looks the called method up there before the
handler runs (a method missing from the table is denied). Handlers then narrow
reads and writes to the caller's project with `visible_project` /
`require_visible`, which answer NOT_FOUND (never PERMISSION_DENIED) for other
projects' resources so that existence never leaks.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from services.common import errors
from services.common.context import Principal, ProjectId


class Role(enum.StrEnum):
    """Project roles in increasing power, plus the cloud-wide roles.

    `service` is held by the users other nubis services call with (compute
    asking the scheduler for claims): it opens only the RPCs whose rule says
    `service_or_cloud_admin`, and ranks nowhere in the project hierarchy.
    """

    READER = "reader"
    MEMBER = "member"
    ADMIN = "admin"
    CLOUD_ADMIN = "cloud-admin"
    SERVICE = "service"


# admin ⊃ member ⊃ reader: a role grants every role below it.
_RANK = {Role.READER: 1, Role.MEMBER: 2, Role.ADMIN: 3, Role.CLOUD_ADMIN: 4}
PROJECT_ROLES = frozenset({Role.READER, Role.MEMBER, Role.ADMIN})
# Roles granted cloud-wide (no project), by cloud-admins only.
CLOUD_ROLES = frozenset({Role.CLOUD_ADMIN, Role.SERVICE})


class Scope(enum.Enum):
    """Who may call: anyone with a token, project-role holders, or operators only."""

    # Any valid token; the handler decides what it may see (e.g. its own user).
    AUTHENTICATED = "authenticated"
    # The token's project role must reach the rule's role.
    PROJECT = "project"
    # Only a cloud-admin.
    CLOUD = "cloud"
    # A cloud-admin, or another nubis service (the service role).
    SERVICE = "service"


@dataclass(frozen=True)
class Rule:
    """What one RPC requires of its caller."""

    scope: Scope
    role: Role = Role.READER
    # PROJECT scope: the service role passes too (an agent fetching an image for a project).
    services: bool = False

    @property
    def mutating(self) -> bool:
        """True when readers are not allowed (used by the authorization matrix)."""
        if self.scope in (Scope.CLOUD, Scope.SERVICE):
            return True
        return _RANK[self.role] > _RANK[Role.READER]


PolicyTable = Mapping[str, Rule]


def reader() -> Rule:
    """Read access inside the caller's project."""
    return Rule(Scope.PROJECT, Role.READER)


def reader_or_service() -> Rule:
    """Read access inside the caller's project, or for another nubis service (any project)."""
    return Rule(Scope.PROJECT, Role.READER, services=True)


def member() -> Rule:
    """Create/change ordinary resources inside the caller's project."""
    return Rule(Scope.PROJECT, Role.MEMBER)


def member_or_service() -> Rule:
    """Change resources inside the caller's project, or for another nubis service (any project)."""
    return Rule(Scope.PROJECT, Role.MEMBER, services=True)


def admin() -> Rule:
    """Administer the caller's project (roles, project settings)."""
    return Rule(Scope.PROJECT, Role.ADMIN)


def cloud_admin() -> Rule:
    """Operators only."""
    return Rule(Scope.CLOUD, Role.CLOUD_ADMIN)


def service_or_cloud_admin() -> Rule:
    """Operators, and other nubis services calling on a project's behalf."""
    return Rule(Scope.SERVICE, Role.SERVICE)


def authenticated() -> Rule:
    """Any valid token."""
    return Rule(Scope.AUTHENTICATED)


def is_cloud_admin(principal: Principal) -> bool:
    return Role.CLOUD_ADMIN.value in principal.roles


def is_service(principal: Principal) -> bool:
    return Role.SERVICE.value in principal.roles


def has_project_role(principal: Principal, role: Role) -> bool:
    """True if the token's project roles (or cloud-admin) reach `role`."""
    if is_cloud_admin(principal):
        return True
    needed = _RANK[role]
    return any(_RANK.get(Role(r), 0) >= needed for r in principal.roles if r in _VALUES)


_VALUES = frozenset(role.value for role in Role)


def authorize(principal: Principal, rule: Rule) -> None:
    """Raise PermissionDenied unless `principal` satisfies `rule`."""
    if rule.scope is Scope.AUTHENTICATED:
        return
    if rule.scope is Scope.CLOUD:
        if not is_cloud_admin(principal):
            raise errors.PermissionDenied(
                "this call needs the cloud-admin role", reason="nubis.policy.denied",
                metadata={"required_role": Role.CLOUD_ADMIN.value},
            )
        return
    if rule.scope is Scope.SERVICE:
        if not (is_cloud_admin(principal) or is_service(principal)):
            raise errors.PermissionDenied(
                "this call needs the cloud-admin or service role", reason="nubis.policy.denied",
                metadata={"required_role": Role.SERVICE.value},
            )
        return
    if rule.services and is_service(principal):
        return
    if not has_project_role(principal, rule.role):
        raise errors.PermissionDenied(
            f"this call needs the {rule.role.value} role on the project",
            reason="nubis.policy.denied",
            metadata={"required_role": rule.role.value, "project_id": principal.project_id},
        )


def check(table: PolicyTable, method: str, principal: Principal) -> None:
    """Authorize `principal` for the full method name; unknown methods are denied."""
    rule = table.get(method)
    if rule is None:
        raise errors.PermissionDenied(
            "no policy allows this call", reason="nubis.policy.denied",
            metadata={"method": method},
        )
    authorize(principal, rule)


def visible(principal: Principal, project_id: str) -> bool:
    """May `principal` see a resource of `project_id`? (cloud-admin sees every project)."""
    return project_id == principal.project_id or is_cloud_admin(principal)


def require_visible(principal: Principal, project_id: str, kind: str, resource_id: str) -> None:
    """NOT_FOUND for another project's resource: the caller must not learn that it exists."""
    if not visible(principal, project_id):
        raise errors.NotFound(f"{kind} {resource_id} not found", metadata={"id": resource_id})


def list_scope(principal: Principal, *, all_projects: bool) -> ProjectId | None:
    """The project a List is limited to, or None for every project.

    Reads default to the token's project; a cloud-admin sees every project
    only when it asks explicitly (`all_projects`), and anyone else asking for
    that is refused.
    """
    if not all_projects:
        return principal.project_id
    if not is_cloud_admin(principal):
        raise errors.PermissionDenied(
            "all_projects needs the cloud-admin role", reason="nubis.policy.denied",
            metadata={"required_role": Role.CLOUD_ADMIN.value},
        )
    return None


def target_project(principal: Principal, requested: str, kind: str) -> ProjectId:
    """The project a request names (empty = the token's), hidden as NOT_FOUND if not visible."""
    if not requested:
        return principal.project_id
    require_visible(principal, requested, kind, requested)
    return ProjectId(requested)
