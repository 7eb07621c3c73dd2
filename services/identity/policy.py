"""Who may call each IdentityService RPC: the one place identity's authorization is declared.

Finer checks that depend on the target (own user, own project, cloud-admin only
roles) are made by the domain modules with services.common.policy helpers.
"""

from __future__ import annotations

from services.common import policy

SERVICE = "nubis.identity.v1.IdentityService"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# Calls that need no token at all (logging in, fetching the verification keys).
PUBLIC_METHODS = frozenset({_method("Authenticate"), _method("ListSigningKeys")})

TABLE: policy.PolicyTable = {
    _method("RevokeToken"): policy.authenticated(),
    _method("CreateProject"): policy.cloud_admin(),
    _method("GetProject"): policy.reader(),
    _method("ListProjects"): policy.reader(),
    _method("UpdateProject"): policy.admin(),
    _method("DeleteProject"): policy.cloud_admin(),
    _method("CreateUser"): policy.cloud_admin(),
    _method("GetUser"): policy.authenticated(),
    _method("ListUsers"): policy.reader(),
    _method("UpdateUser"): policy.authenticated(),
    _method("DeleteUser"): policy.cloud_admin(),
    _method("GrantRole"): policy.admin(),
    _method("RevokeRole"): policy.admin(),
    _method("ListRoleAssignments"): policy.reader(),
    _method("GetQuota"): policy.reader(),
    _method("UpdateQuota"): policy.cloud_admin(),
    _method("GetUsage"): policy.reader(),
    _method("GetDefaultQuota"): policy.authenticated(),
    _method("UpdateDefaultQuota"): policy.cloud_admin(),
    _method("ListEndpoints"): policy.authenticated(),
}
