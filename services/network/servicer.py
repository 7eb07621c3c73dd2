"""NetworkService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. RPCs not written
yet fall through to the generated base and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

from nubis.network.v1 import network_service_pb2_grpc, security_group_pb2

from services.client import peers
from services.common import context, errors
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.network import security_group, security_group_rule

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


def _principal() -> context.Principal:
    """The verified caller, for handlers whose domain scopes everything to it."""
    principal = context.current().principal
    if principal is None:  # only reachable if a method was wrongly made public
        raise errors.Unauthenticated("missing bearer token", reason="nubis.auth.missing_token")
    return principal


class NetworkServicer(network_service_pb2_grpc.NetworkServiceServicer):
    """The network API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients

    # --- security groups ---

    async def GetSecurityGroup(self, request: security_group_pb2.GetSecurityGroupRequest,
                               ctx: Ctx) -> security_group_pb2.SecurityGroup:
        return await security_group.get(self._store, _principal(), request.id)

    async def ListSecurityGroups(
        self, request: security_group_pb2.ListSecurityGroupsRequest, ctx: Ctx,
    ) -> security_group_pb2.ListSecurityGroupsResponse:
        found, next_token = await security_group.list_groups(self._store, _principal(), request)
        return security_group_pb2.ListSecurityGroupsResponse(
            security_groups=found, next_page_token=next_token)

    async def CreateSecurityGroup(self, request: security_group_pb2.CreateSecurityGroupRequest,
                                  ctx: Ctx) -> security_group_pb2.SecurityGroup:
        return await security_group.create(self._store, _principal(), request)

    async def UpdateSecurityGroup(self, request: security_group_pb2.UpdateSecurityGroupRequest,
                                  ctx: Ctx) -> security_group_pb2.SecurityGroup:
        return await security_group.update(self._store, _principal(), request.security_group,
                                           list(request.update_mask.paths))

    async def DeleteSecurityGroup(
        self, request: security_group_pb2.DeleteSecurityGroupRequest, ctx: Ctx,
    ) -> security_group_pb2.DeleteSecurityGroupResponse:
        await security_group.delete(self._store, _principal(), request.id, request.revision)
        return security_group_pb2.DeleteSecurityGroupResponse()

    async def GetSecurityGroupRule(
        self, request: security_group_pb2.GetSecurityGroupRuleRequest, ctx: Ctx,
    ) -> security_group_pb2.SecurityGroupRule:
        return await security_group_rule.get(self._store, _principal(), request.id)

    async def ListSecurityGroupRules(
        self, request: security_group_pb2.ListSecurityGroupRulesRequest, ctx: Ctx,
    ) -> security_group_pb2.ListSecurityGroupRulesResponse:
        found, next_token = await security_group_rule.list_rules(self._store, _principal(),
                                                                 request)
        return security_group_pb2.ListSecurityGroupRulesResponse(
            security_group_rules=found, next_page_token=next_token)

    async def CreateSecurityGroupRule(
        self, request: security_group_pb2.CreateSecurityGroupRuleRequest, ctx: Ctx,
    ) -> security_group_pb2.SecurityGroupRule:
        return await security_group_rule.create(self._store, self._sender, _principal(), request)

    async def DeleteSecurityGroupRule(
        self, request: security_group_pb2.DeleteSecurityGroupRuleRequest, ctx: Ctx,
    ) -> security_group_pb2.DeleteSecurityGroupRuleResponse:
        await security_group_rule.delete(self._store, self._sender, _principal(), request.id,
                                         request.revision)
        return security_group_pb2.DeleteSecurityGroupRuleResponse()
