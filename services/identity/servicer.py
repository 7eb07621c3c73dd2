"""IdentityService handlers: context → domain call → response (policy ran in the auth hook)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common import auth, context, errors
from services.common.context import Principal
from services.common.settings import Settings
from services.common.store import Store
from services.identity import catalog, project, quota, role, token, user

Ctx = grpc.aio.ServicerContext[object, object]


def _caller() -> Principal:
    principal = context.current().principal
    if principal is None:  # only reachable if a method was wrongly made public
        raise errors.Unauthenticated("missing bearer token", reason="nubis.auth.missing_token")
    return principal


@dataclass
class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    """Thin adapter from gRPC to the identity domain modules."""

    store: Store
    settings: Settings
    issuer: token.Issuer
    verifier: auth.TokenVerifier

    @property
    def _ttl(self) -> int:
        return self.settings.auth.token_ttl

    async def Authenticate(self, request: identity_pb2.AuthenticateRequest,
                           ctx: Ctx) -> identity_pb2.AuthenticateResponse:
        return await token.authenticate(
            self.issuer, request.username, request.password, request.project
        )

    async def RevokeToken(self, request: identity_pb2.RevokeTokenRequest,
                          ctx: Ctx) -> identity_pb2.RevokeTokenResponse:
        await token.revoke(self.store, self.verifier, _caller(), request.token,
                           request.token_id, token_ttl=self._ttl)
        return identity_pb2.RevokeTokenResponse()

    async def ListSigningKeys(self, request: identity_pb2.ListSigningKeysRequest,
                              ctx: Ctx) -> identity_pb2.ListSigningKeysResponse:
        keys = await token.public_keys(self.store)
        return identity_pb2.ListSigningKeysResponse(keys=keys)

    async def CreateProject(self, request: identity_pb2.CreateProjectRequest,
                            ctx: Ctx) -> identity_pb2.Project:
        return await project.create(self.store, _caller(), request)

    async def GetProject(self, request: identity_pb2.GetProjectRequest,
                         ctx: Ctx) -> identity_pb2.Project:
        return await project.get(self.store, _caller(), request.id)

    async def ListProjects(self, request: identity_pb2.ListProjectsRequest,
                           ctx: Ctx) -> identity_pb2.ListProjectsResponse:
        projects, next_token = await project.list_projects(self.store, _caller(), request)
        return identity_pb2.ListProjectsResponse(projects=projects, next_page_token=next_token)

    async def UpdateProject(self, request: identity_pb2.UpdateProjectRequest,
                            ctx: Ctx) -> identity_pb2.Project:
        return await project.update(self.store, _caller(), request.project,
                                    list(request.update_mask.paths), token_ttl=self._ttl)

    async def DeleteProject(self, request: identity_pb2.DeleteProjectRequest,
                            ctx: Ctx) -> identity_pb2.DeleteProjectResponse:
        await project.delete(self.store, request.id, request.revision, token_ttl=self._ttl)
        return identity_pb2.DeleteProjectResponse()

    async def CreateUser(self, request: identity_pb2.CreateUserRequest,
                         ctx: Ctx) -> identity_pb2.User:
        return await user.create(self.store, self.issuer.hasher, _caller(), request)

    async def GetUser(self, request: identity_pb2.GetUserRequest, ctx: Ctx) -> identity_pb2.User:
        return await user.get(self.store, _caller(), request.id)

    async def ListUsers(self, request: identity_pb2.ListUsersRequest,
                        ctx: Ctx) -> identity_pb2.ListUsersResponse:
        users, next_token = await user.list_users(self.store, _caller(), request)
        return identity_pb2.ListUsersResponse(users=users, next_page_token=next_token)

    async def UpdateUser(self, request: identity_pb2.UpdateUserRequest,
                         ctx: Ctx) -> identity_pb2.User:
        return await user.update(
            self.store, self.issuer.hasher, _caller(), request.user,
            list(request.update_mask.paths), request.password, token_ttl=self._ttl,
            original_password=request.original_password, throttle=self.issuer.throttle,
        )

    async def DeleteUser(self, request: identity_pb2.DeleteUserRequest,
                         ctx: Ctx) -> identity_pb2.DeleteUserResponse:
        await user.delete(self.store, request.id, request.revision, token_ttl=self._ttl)
        return identity_pb2.DeleteUserResponse()

    async def GrantRole(self, request: identity_pb2.GrantRoleRequest,
                        ctx: Ctx) -> identity_pb2.RoleAssignment:
        return await role.grant(self.store, _caller(), request.user_id, request.project_id,
                                request.role)

    async def RevokeRole(self, request: identity_pb2.RevokeRoleRequest,
                         ctx: Ctx) -> identity_pb2.RevokeRoleResponse:
        await role.revoke(self.store, _caller(), request.user_id, request.project_id,
                          request.role, token_ttl=self._ttl)
        return identity_pb2.RevokeRoleResponse()

    async def ListRoleAssignments(self, request: identity_pb2.ListRoleAssignmentsRequest,
                                  ctx: Ctx) -> identity_pb2.ListRoleAssignmentsResponse:
        assignments, next_token = await role.list_assignments(self.store, _caller(), request)
        return identity_pb2.ListRoleAssignmentsResponse(assignments=assignments,
                                                        next_page_token=next_token)

    async def GetQuota(self, request: identity_pb2.GetQuotaRequest,
                       ctx: Ctx) -> identity_pb2.Quota:
        return await quota.get_quota(self.store, _caller(), request.project_id)

    async def UpdateQuota(self, request: identity_pb2.UpdateQuotaRequest,
                          ctx: Ctx) -> identity_pb2.Quota:
        return await quota.update_quota(self.store, _caller(), request)

    async def GetUsage(self, request: identity_pb2.GetUsageRequest,
                       ctx: Ctx) -> identity_pb2.Usage:
        return await quota.get_usage(self.store, _caller(), request.project_id)

    async def GetDefaultQuota(self, request: identity_pb2.GetDefaultQuotaRequest,
                              ctx: Ctx) -> identity_pb2.Quota:
        return await quota.get_defaults(self.store)

    async def UpdateDefaultQuota(self, request: identity_pb2.UpdateDefaultQuotaRequest,
                                 ctx: Ctx) -> identity_pb2.Quota:
        return await quota.update_defaults(self.store, request)

    async def ListEndpoints(self, request: identity_pb2.ListEndpointsRequest,
                            ctx: Ctx) -> identity_pb2.ListEndpointsResponse:
        endpoints = await catalog.list_endpoints(self.store, request.name)
        return identity_pb2.ListEndpointsResponse(endpoints=endpoints)
