"""SchedulerService over gRPC: thin handlers from request to domain call and back."""

from __future__ import annotations

from typing import Any

from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.common import context, policy
from services.common.settings import SchedulerSettings
from services.common.store import Store
from services.scheduler import allocations, nodes, placement, ratios, server_groups
from services.scheduler import cache as cache_module

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


def _project(requested: str) -> str:
    caller = _caller()
    return requested if caller is None else policy.target_project(caller, requested, "project")


def _consumer_project(requested: str) -> str:
    """The owner of the consumers: a service claims for any project it names."""
    caller = _caller()
    if caller is not None and policy.is_service(caller) and requested:
        return requested
    return _project(requested)


def _require_visible(group: scheduler_pb2.ServerGroup) -> None:
    caller = _caller()
    if caller is not None:
        policy.require_visible(caller, group.meta.project_id, "server group", group.meta.id)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """Nodes, placement claims and server groups."""

    def __init__(
        self, store: Store, cache: cache_module.NodeCache, places: placement.Placement,
        settings: SchedulerSettings,
    ) -> None:
        self._store = store
        self._cache = cache
        self._places = places
        self._settings = settings

    async def ListNodes(
        self, request: scheduler_pb2.ListNodesRequest, ctx: Ctx
    ) -> scheduler_pb2.ListNodesResponse:
        page, token = nodes.list_nodes(
            self._cache, request.page_size, request.page_token, request.filter
        )
        return scheduler_pb2.ListNodesResponse(nodes=page, next_page_token=token)

    async def GetNode(self, request: scheduler_pb2.GetNodeRequest, ctx: Ctx) -> scheduler_pb2.Node:
        return nodes.get_node(self._cache, request.name)

    async def UpdateNode(
        self, request: scheduler_pb2.UpdateNodeRequest, ctx: Ctx
    ) -> scheduler_pb2.Node:
        return await nodes.update_node(self._store, self._cache, request)

    async def GetDefaultAllocationRatios(
        self, request: scheduler_pb2.GetDefaultAllocationRatiosRequest, ctx: Ctx
    ) -> scheduler_pb2.DefaultAllocationRatios:
        return await ratios.get(self._store)

    async def UpdateDefaultAllocationRatios(
        self, request: scheduler_pb2.UpdateDefaultAllocationRatiosRequest, ctx: Ctx
    ) -> scheduler_pb2.DefaultAllocationRatios:
        return await ratios.update(self._store, self._cache, request)

    async def SelectDestinations(
        self, request: scheduler_pb2.SelectDestinationsRequest, ctx: Ctx
    ) -> scheduler_pb2.SelectDestinationsResponse:
        project_id = _consumer_project(request.spec.project_id)
        chosen = await self._places.select_destinations(request.spec, project_id)
        return scheduler_pb2.SelectDestinationsResponse(destinations=chosen)

    async def GetAllocations(
        self, request: scheduler_pb2.GetAllocationsRequest, ctx: Ctx
    ) -> scheduler_pb2.ConsumerAllocations:
        return await allocations.get(self._store, request.consumer_id)

    async def ReleaseAllocations(
        self, request: scheduler_pb2.ReleaseAllocationsRequest, ctx: Ctx
    ) -> scheduler_pb2.ReleaseAllocationsResponse:
        await allocations.release(self._store, request.consumer_id, request.node_name,
                                  patience=self._settings.claim_timeout)
        return scheduler_pb2.ReleaseAllocationsResponse()

    async def MoveAllocations(
        self, request: scheduler_pb2.MoveAllocationsRequest, ctx: Ctx
    ) -> scheduler_pb2.ConsumerAllocations:
        return await allocations.move(self._places, request)

    async def CreateServerGroup(
        self, request: scheduler_pb2.CreateServerGroupRequest, ctx: Ctx
    ) -> scheduler_pb2.ServerGroup:
        project_id = _project(request.server_group.meta.project_id)
        return await server_groups.create(self._store, request, project_id)

    async def GetServerGroup(
        self, request: scheduler_pb2.GetServerGroupRequest, ctx: Ctx
    ) -> scheduler_pb2.ServerGroup:
        group = await server_groups.fetch(self._store, request.id)
        _require_visible(group)
        return group

    async def ListServerGroups(
        self, request: scheduler_pb2.ListServerGroupsRequest, ctx: Ctx
    ) -> scheduler_pb2.ListServerGroupsResponse:
        caller = _caller()
        scope = None if caller is None else policy.list_scope(
            caller, all_projects=request.all_projects)
        wanted = server_groups.group_filter(
            request.filter, admin=caller is None or policy.is_cloud_admin(caller))
        page, token = await server_groups.list_groups(
            self._store, scope, request.page_size, request.page_token, wanted
        )
        return scheduler_pb2.ListServerGroupsResponse(server_groups=page, next_page_token=token)

    async def DeleteServerGroup(
        self, request: scheduler_pb2.DeleteServerGroupRequest, ctx: Ctx
    ) -> scheduler_pb2.DeleteServerGroupResponse:
        group = await server_groups.fetch(self._store, request.id)
        _require_visible(group)
        await server_groups.delete(self._store, group.meta.id, request.revision)
        return scheduler_pb2.DeleteServerGroupResponse()
