"""NetworkService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. RPCs not written
yet fall through to the generated base and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nubis.network.v1 import (
    floating_ip_pb2,
    network_pb2,
    network_service_pb2_grpc,
    port_pb2,
    router_pb2,
    security_group_pb2,
    subnet_pb2,
)

from services.client import peers
from services.common import context, errors, policy, resources
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.network import (
    binding,
    floating_ip,
    ipam,
    network,
    port,
    port_batch,
    port_filter,
    port_watch,
    router,
    router_node,
    security_group,
    security_group_rule,
    subnet,
)

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


def _scope(all_projects: bool) -> tuple[context.Principal | None, str | None]:
    """The caller and the project a List or Watch covers (None: every project)."""
    caller = _caller()
    if caller is None:
        return None, None
    if all_projects and policy.is_service(caller):
        return caller, None  # a nubis service acts for the projects it names (project_id=...)
    return caller, policy.list_scope(caller, all_projects=all_projects)


def _project(requested: str) -> str:
    """The project a create acts in: a nubis service names it, others default to theirs."""
    caller = _caller()
    if requested:
        # It becomes a key segment (quota usage, request ids): a project id or nothing.
        resources.check_id(requested, "meta.project_id")
    if caller is None:
        return requested
    if policy.is_service(caller) and not policy.is_cloud_admin(caller):
        if not requested:
            raise errors.InvalidArgument(
                "a service creating for a project names it in meta.project_id",
                violations=[errors.FieldViolation("meta.project_id", "required for services")])
        return requested
    return policy.target_project(caller, requested, "project")


class NetworkServicer(network_service_pb2_grpc.NetworkServiceServicer):
    """The network API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients
        self._turns = port.Turns()
        self._batcher = port_batch.Batcher()
        # Its loop runs in the service's background (main.py), its passes in Bind/UnbindPort.
        self.realizer = binding.Realizer(store, settings.networking, sender, clients)

    def _creation(self, project_id: str) -> port.Creation:
        return port.Creation(self._store, self._settings.networking, self._turns, _caller(),
                             project_id)

    # --- networks ---

    async def GetNetwork(self, request: network_pb2.GetNetworkRequest,
                         ctx: Ctx) -> network_pb2.Network:
        return await network.get(self._store, _caller(), request.id)

    async def ListNetworks(self, request: network_pb2.ListNetworksRequest,
                           ctx: Ctx) -> network_pb2.ListNetworksResponse:
        caller, scope = _scope(request.all_projects)
        wanted = network.network_filter(request.filter, admin=network.is_admin(caller))
        found, token = await network.list_networks(self._store, caller, scope, request.page_size,
                                                   request.page_token, wanted)
        return network_pb2.ListNetworksResponse(networks=found, next_page_token=token)

    async def CreateNetwork(self, request: network_pb2.CreateNetworkRequest,
                            ctx: Ctx) -> network_pb2.Network:
        project_id = _project(request.network.meta.project_id)
        return await network.create(self._store, self._settings.networking, _caller(), request,
                                    project_id)

    async def UpdateNetwork(self, request: network_pb2.UpdateNetworkRequest,
                            ctx: Ctx) -> network_pb2.Network:
        return await network.update(self._store, _caller(), request)

    async def DeleteNetwork(self, request: network_pb2.DeleteNetworkRequest,
                            ctx: Ctx) -> network_pb2.DeleteNetworkResponse:
        await network.delete(self._store, _caller(), request)
        return network_pb2.DeleteNetworkResponse()

    async def GetNetworkIpAvailability(
        self, request: network_pb2.GetNetworkIpAvailabilityRequest, ctx: Ctx,
    ) -> network_pb2.NetworkIpAvailability:
        found = await network.get(self._store, _caller(), request.network_id)
        return await ipam.availability(self._store, found)

    # --- subnets ---

    async def GetSubnet(self, request: subnet_pb2.GetSubnetRequest,
                        ctx: Ctx) -> subnet_pb2.Subnet:
        return await subnet.get(self._store, _caller(), request.id)

    async def ListSubnets(self, request: subnet_pb2.ListSubnetsRequest,
                          ctx: Ctx) -> subnet_pb2.ListSubnetsResponse:
        caller, scope = _scope(request.all_projects)
        wanted = subnet.subnet_filter(request.filter, admin=network.is_admin(caller))
        found, token = await subnet.list_subnets(self._store, caller, scope, request.page_size,
                                                 request.page_token, wanted)
        return subnet_pb2.ListSubnetsResponse(subnets=found, next_page_token=token)

    async def CreateSubnet(self, request: subnet_pb2.CreateSubnetRequest,
                           ctx: Ctx) -> subnet_pb2.Subnet:
        return await subnet.create(self._store, _caller(), request)

    async def UpdateSubnet(self, request: subnet_pb2.UpdateSubnetRequest,
                           ctx: Ctx) -> subnet_pb2.Subnet:
        return await subnet.update(self._store, _caller(), request)

    async def DeleteSubnet(self, request: subnet_pb2.DeleteSubnetRequest,
                           ctx: Ctx) -> subnet_pb2.DeleteSubnetResponse:
        await subnet.delete(self._store, _caller(), request)
        return subnet_pb2.DeleteSubnetResponse()

    # --- ports ---

    async def GetPort(self, request: port_pb2.GetPortRequest, ctx: Ctx) -> port_pb2.Port:
        return await port.get(self._store, _caller(), request.id)

    async def ListPorts(self, request: port_pb2.ListPortsRequest,
                        ctx: Ctx) -> port_pb2.ListPortsResponse:
        caller, scope = _scope(request.all_projects)
        wanted = port.port_filter(request.filter, admin=network.is_admin(caller))
        found, token = await port.list_ports(self._store, caller, scope, request.page_size,
                                             request.page_token, wanted)
        return port_pb2.ListPortsResponse(ports=found, next_page_token=token)

    async def CreatePort(self, request: port_pb2.CreatePortRequest, ctx: Ctx) -> port_pb2.Port:
        project_id = _project(request.port.meta.project_id)
        return await self._batcher.create(self._creation(project_id), request)

    async def UpdatePort(self, request: port_pb2.UpdatePortRequest, ctx: Ctx) -> port_pb2.Port:
        before = await port_filter.current(self._store, request.port.meta.id)
        after = await port.update(self._store, _caller(), request)
        if before is not None:
            await port_filter.on_change(self._store, self._sender, before, after)
        return after

    async def DeletePort(self, request: port_pb2.DeletePortRequest,
                         ctx: Ctx) -> port_pb2.DeletePortResponse:
        before = await port_filter.current(self._store, request.id)
        changed = await port.delete(self._store, _caller(), request)
        await self.realizer.realize_all(changed)
        if before is not None:
            self.realizer.refresh_members(await port_filter.on_unbind(self._sender, before))
            await floating_ip.port_gone(self.router_env, request.id)
        return port_pb2.DeletePortResponse()

    async def WatchPorts(self, request: port_pb2.WatchPortsRequest,
                         ctx: Ctx) -> AsyncIterator[port_pb2.PortEvent]:
        caller, scope = _scope(request.options.all_projects)
        async for event in port_watch.watch(self._store, caller, scope, request):
            yield event

    async def BindPort(self, request: port_pb2.BindPortRequest, ctx: Ctx) -> port_pb2.Port:
        return await binding.bind(self._store, self.realizer, request)

    async def UnbindPort(self, request: port_pb2.UnbindPortRequest, ctx: Ctx) -> port_pb2.Port:
        return await binding.unbind(self._store, self.realizer, request)

    # --- routers ---

    @property
    def router_env(self) -> router_node.Env:
        """What router and floating IP calls (and the router reconcile loop) work with."""
        return router_node.Env(self._store, self._settings.networking, self._turns,
                               self.realizer, self._sender, self._clients)

    async def GetRouter(self, request: router_pb2.GetRouterRequest,
                        ctx: Ctx) -> router_pb2.Router:
        return await router.get(self.router_env, _principal(), request.id)

    async def ListRouters(self, request: router_pb2.ListRoutersRequest,
                          ctx: Ctx) -> router_pb2.ListRoutersResponse:
        found, next_token = await router.list_routers(self.router_env, _principal(), request)
        return router_pb2.ListRoutersResponse(routers=found, next_page_token=next_token)

    async def CreateRouter(self, request: router_pb2.CreateRouterRequest,
                           ctx: Ctx) -> router_pb2.Router:
        project_id = _project(request.router.meta.project_id)
        return await router.create(self.router_env, _principal(), project_id, request)

    async def UpdateRouter(self, request: router_pb2.UpdateRouterRequest,
                           ctx: Ctx) -> router_pb2.Router:
        return await router.update(self.router_env, _principal(), request)

    async def DeleteRouter(self, request: router_pb2.DeleteRouterRequest,
                           ctx: Ctx) -> router_pb2.DeleteRouterResponse:
        await router.delete(self.router_env, _principal(), request.id, request.revision)
        return router_pb2.DeleteRouterResponse()

    async def AddRouterInterface(self, request: router_pb2.AddRouterInterfaceRequest,
                                 ctx: Ctx) -> router_pb2.Router:
        return await router.add_interface(self.router_env, _principal(), request)

    async def RemoveRouterInterface(self, request: router_pb2.RemoveRouterInterfaceRequest,
                                    ctx: Ctx) -> router_pb2.Router:
        return await router.remove_interface(self.router_env, _principal(), request)

    # --- floating IPs ---

    async def GetFloatingIp(self, request: floating_ip_pb2.GetFloatingIpRequest,
                            ctx: Ctx) -> floating_ip_pb2.FloatingIp:
        return await floating_ip.get(self.router_env, _principal(), request.id)

    async def ListFloatingIps(self, request: floating_ip_pb2.ListFloatingIpsRequest,
                              ctx: Ctx) -> floating_ip_pb2.ListFloatingIpsResponse:
        found, next_token = await floating_ip.list_floating_ips(self.router_env, _principal(),
                                                                request)
        return floating_ip_pb2.ListFloatingIpsResponse(floating_ips=found,
                                                       next_page_token=next_token)

    async def CreateFloatingIp(self, request: floating_ip_pb2.CreateFloatingIpRequest,
                               ctx: Ctx) -> floating_ip_pb2.FloatingIp:
        project_id = _project(request.floating_ip.meta.project_id)
        return await floating_ip.create(self.router_env, _principal(), project_id, request)

    async def UpdateFloatingIp(self, request: floating_ip_pb2.UpdateFloatingIpRequest,
                               ctx: Ctx) -> floating_ip_pb2.FloatingIp:
        return await floating_ip.update(self.router_env, _principal(), request)

    async def DeleteFloatingIp(self, request: floating_ip_pb2.DeleteFloatingIpRequest,
                               ctx: Ctx) -> floating_ip_pb2.DeleteFloatingIpResponse:
        await floating_ip.delete(self.router_env, _principal(), request.id, request.revision)
        return floating_ip_pb2.DeleteFloatingIpResponse()

    async def AssociateFloatingIp(self, request: floating_ip_pb2.AssociateFloatingIpRequest,
                                  ctx: Ctx) -> floating_ip_pb2.FloatingIp:
        return await floating_ip.associate(self.router_env, _principal(), request)

    async def DisassociateFloatingIp(
        self, request: floating_ip_pb2.DisassociateFloatingIpRequest, ctx: Ctx,
    ) -> floating_ip_pb2.FloatingIp:
        return await floating_ip.disassociate(self.router_env, _principal(), request.id)

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
