"""Authorization rows of nubis.identity.v1.IdentityService."""

from __future__ import annotations

import uuid

from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from tests.functional.authz.table import (
    DENIED,
    HIDDEN,
    OK,
    Row,
    add_rows,
    cloud_only,
    expect,
    project_read,
)
from tests.functional.authz.world import World

SERVICE = "nubis.identity.v1.IdentityService"
P = identity_pb2


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _authenticate(world: World) -> message.Message:
    return P.AuthenticateRequest(username="admin", password="admin-secret-password",
                                 project=world.settings.auth.admin_project)


async def _signing_keys(world: World) -> message.Message:
    return P.ListSigningKeysRequest()


async def _revoke_own(world: World) -> message.Message:
    # A fresh token each time, so revoking it never disturbs the named callers.
    return P.RevokeTokenRequest(token=await world.login(world.names["grantee"], world.project_a))


async def _revoke_by_id(world: World) -> message.Message:
    return P.RevokeTokenRequest(token_id=str(uuid.uuid4()))


async def _create_project(world: World) -> message.Message:
    return P.CreateProjectRequest(
        project=P.Project(meta=resource_pb2.ResourceMeta(name=_name("p"))))


async def _get_project(world: World) -> message.Message:
    return P.GetProjectRequest(id=world.project_a)


async def _list_projects(world: World) -> message.Message:
    return P.ListProjectsRequest()


async def _list_all_projects(world: World) -> message.Message:
    return P.ListProjectsRequest(all_projects=True, filter="state=ENABLED")


async def _update_project(world: World) -> message.Message:
    project = P.Project(meta=resource_pb2.ResourceMeta(id=world.project_a,
                                                       description=_name("d")))
    return P.UpdateProjectRequest(project=project,
                                  update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_project(world: World) -> message.Message:
    return P.DeleteProjectRequest(id=await world.make_project(_name("gone")))


async def _create_user(world: World) -> message.Message:
    return P.CreateUserRequest(user=P.User(meta=resource_pb2.ResourceMeta(name=_name("u"))),
                               password="a long enough password")


async def _get_user(world: World) -> message.Message:
    return P.GetUserRequest(id=world.users["a_member"])


async def _list_users(world: World) -> message.Message:
    return P.ListUsersRequest(filter="state=ENABLED")


async def _update_user(world: World) -> message.Message:
    user = P.User(meta=resource_pb2.ResourceMeta(id=world.users["a_member"],
                                                 description=_name("d")))
    return P.UpdateUserRequest(user=user,
                               update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_user(world: World) -> message.Message:
    created = await world.stub.CreateUser(P.CreateUserRequest(
        user=P.User(meta=resource_pb2.ResourceMeta(name=_name("gone"))),
        password="a long enough password"), metadata=world.metadata("cloud_admin"))
    return P.DeleteUserRequest(id=created.meta.id)


async def _grant(world: World) -> message.Message:
    return P.GrantRoleRequest(user_id=world.users["grantee"], project_id=world.project_a,
                              role="member")


async def _revoke_role(world: World) -> message.Message:
    await world.stub.GrantRole(P.GrantRoleRequest(
        user_id=world.users["grantee"], project_id=world.project_a, role="member"),
        metadata=world.metadata("cloud_admin"))
    return P.RevokeRoleRequest(user_id=world.users["grantee"], project_id=world.project_a,
                               role="member")


async def _list_roles(world: World) -> message.Message:
    return P.ListRoleAssignmentsRequest(project_id=world.project_a)


async def _get_quota(world: World) -> message.Message:
    return P.GetQuotaRequest(project_id=world.project_a)


async def _update_quota(world: World) -> message.Message:
    return P.UpdateQuotaRequest(
        quota=P.Quota(project_id=world.project_a, limits={"routers": 7}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.routers"]))


async def _get_usage(world: World) -> message.Message:
    return P.GetUsageRequest(project_id=world.project_a)


async def _get_default_quota(world: World) -> message.Message:
    return P.GetDefaultQuotaRequest()


async def _update_default_quota(world: World) -> message.Message:
    # The value it has already: the other tests of the package see the same defaults.
    current = await world.stub.GetDefaultQuota(P.GetDefaultQuotaRequest(),
                                               metadata=world.metadata("cloud_admin"))
    return P.UpdateDefaultQuotaRequest(
        quota=P.Quota(limits={"routers": current.limits["routers"]}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.routers"]))


async def _list_endpoints(world: World) -> message.Message:
    return P.ListEndpointsRequest()


def _no_project_a(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, P.ListProjectsResponse)
    ids = {project.meta.id for project in reply.projects}
    assert (world.project_a in ids) == caller.startswith("a_"), (caller, ids)


def _no_users_of_a(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, P.ListUsersResponse)
    ids = {user.meta.id for user in reply.users}
    assert (world.users["a_member"] in ids) == caller.startswith("a_"), (caller, ids)


add_rows(
    Row(SERVICE, "Authenticate", _authenticate, {"none": OK}, public=True),
    Row(SERVICE, "ListSigningKeys", _signing_keys, {"none": OK}, public=True),
    Row(SERVICE, "RevokeToken", _revoke_own, expect(), case="own token"),
    Row(SERVICE, "RevokeToken", _revoke_by_id, cloud_only(), case="by id"),
    Row(SERVICE, "CreateProject", _create_project, cloud_only()),
    Row(SERVICE, "GetProject", _get_project, project_read()),
    Row(SERVICE, "ListProjects", _list_projects, expect(), check=_no_project_a),
    Row(SERVICE, "ListProjects", _list_all_projects, cloud_only(), case="all projects"),
    Row(SERVICE, "UpdateProject", _update_project,
        expect(a_member=DENIED, a_reader=DENIED, b_admin=HIDDEN)),
    Row(SERVICE, "DeleteProject", _delete_project, cloud_only()),
    Row(SERVICE, "CreateUser", _create_user, cloud_only()),
    Row(SERVICE, "GetUser", _get_user, project_read()),
    Row(SERVICE, "ListUsers", _list_users, expect(), check=_no_users_of_a),
    Row(SERVICE, "UpdateUser", _update_user,
        expect(a_admin=DENIED, a_reader=DENIED, b_admin=HIDDEN)),
    Row(SERVICE, "DeleteUser", _delete_user, cloud_only()),
    Row(SERVICE, "GrantRole", _grant,
        expect(a_member=DENIED, a_reader=DENIED, b_admin=HIDDEN)),
    Row(SERVICE, "RevokeRole", _revoke_role,
        expect(a_member=DENIED, a_reader=DENIED, b_admin=HIDDEN)),
    Row(SERVICE, "ListRoleAssignments", _list_roles, project_read()),
    Row(SERVICE, "GetQuota", _get_quota, project_read()),
    Row(SERVICE, "UpdateQuota", _update_quota, cloud_only()),
    Row(SERVICE, "GetUsage", _get_usage, project_read()),
    Row(SERVICE, "GetDefaultQuota", _get_default_quota, expect()),
    Row(SERVICE, "UpdateDefaultQuota", _update_default_quota, cloud_only()),
    Row(SERVICE, "ListEndpoints", _list_endpoints, expect()),
)
