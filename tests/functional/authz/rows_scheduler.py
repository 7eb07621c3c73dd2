"""Authorization rows of nubis.scheduler.v1.SchedulerService.

Reading nodes (and the cloud's default allocation ratios) and every
allocation RPC take cloud-admin or the `service` role (another nubis service
claiming for a project); changing a node or the default ratios is cloud-admin
only. Server groups are project resources: members write, readers
read, and another project cannot see them.
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import ServiceEndpoint
from services.scheduler import keys, main
from tests.functional.authz.table import (
    DENIED,
    OK,
    Row,
    add_rows,
    add_service,
    cloud_only,
    expect,
    project_read,
    project_write,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.scheduler.v1.SchedulerService"
P = scheduler_pb2
NODES = ("authz-node-1", "authz-node-2")
SMALL = P.Resources(vcpus=1, memory_mb=64, disk_gb=1)


async def _start(world: World) -> Service:
    for name in NODES:
        report = P.NodeReport(name=name, capacity=P.Resources(vcpus=64, memory_mb=262144,
                                                              disk_gb=10000),
                              availability_zone="nova", queue=f"node.{name}")
        await world.store.create(keys.node_report(name), report)
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


add_service(SERVICE, _start)


async def _placed(world: World) -> str:
    """A consumer freshly placed on the first node (by the cloud admin)."""
    consumer = str(uuid.uuid4())
    await world.call(SERVICE, "SelectDestinations", P.SelectDestinationsRequest(spec=P.RequestSpec(
        resources=SMALL, consumer_ids=[consumer], avoid_nodes=[NODES[1]],
        project_id=world.project_a)), "cloud_admin")
    return consumer


async def _group_in_a(world: World) -> str:
    group = P.ServerGroup(meta=resource_pb2.ResourceMeta(name=f"g-{uuid.uuid4().hex[:6]}",
                                                         project_id=world.project_a),
                          policy=P.SOFT_ANTI_AFFINITY)
    reply = await world.call(SERVICE, "CreateServerGroup",
                             P.CreateServerGroupRequest(server_group=group), "cloud_admin")
    assert isinstance(reply, P.ServerGroup)
    return reply.meta.id


async def _list_nodes(world: World) -> message.Message:
    return P.ListNodesRequest()


async def _get_node(world: World) -> message.Message:
    return P.GetNodeRequest(name=NODES[0])


async def _update_node(world: World) -> message.Message:
    return P.UpdateNodeRequest(name=NODES[0], settings=P.NodeSettings(disabled=False),
                               update_mask=field_mask_pb2.FieldMask(paths=["disabled"]))


async def _get_default_ratios(world: World) -> message.Message:
    return P.GetDefaultAllocationRatiosRequest()


async def _update_default_ratios(world: World) -> message.Message:
    # The value it has already: the other tests of the package see the same capacity.
    current = await world.call(SERVICE, "GetDefaultAllocationRatios",
                               P.GetDefaultAllocationRatiosRequest(), "cloud_admin")
    assert isinstance(current, P.DefaultAllocationRatios)
    return P.UpdateDefaultAllocationRatiosRequest(
        default_allocation_ratios=P.DefaultAllocationRatios(
            ratios=P.AllocationRatios(cpu=current.ratios.cpu)),
        update_mask=field_mask_pb2.FieldMask(paths=["ratios.cpu"]))


async def _select(world: World) -> message.Message:
    return P.SelectDestinationsRequest(spec=P.RequestSpec(
        resources=SMALL, consumer_ids=[str(uuid.uuid4())], project_id=world.project_a))


async def _get_allocations(world: World) -> message.Message:
    return P.GetAllocationsRequest(consumer_id=await _placed(world))


async def _release(world: World) -> message.Message:
    return P.ReleaseAllocationsRequest(consumer_id=await _placed(world))


async def _move(world: World) -> message.Message:
    return P.MoveAllocationsRequest(consumer_id=await _placed(world), target_node=NODES[1])


async def _create_group(world: World) -> message.Message:
    return P.CreateServerGroupRequest(server_group=P.ServerGroup(
        meta=resource_pb2.ResourceMeta(name="web", project_id=world.project_a),
        policy=P.ANTI_AFFINITY))


async def _create_own_group(world: World) -> message.Message:
    return P.CreateServerGroupRequest(server_group=P.ServerGroup(
        meta=resource_pb2.ResourceMeta(name="mine"), policy=P.AFFINITY))


async def _get_group(world: World) -> message.Message:
    return P.GetServerGroupRequest(id=await _group_in_a(world))


async def _list_groups(world: World) -> message.Message:
    await _group_in_a(world)
    return P.ListServerGroupsRequest()


async def _list_all_groups(world: World) -> message.Message:
    return P.ListServerGroupsRequest(all_projects=True)


async def _delete_group(world: World) -> message.Message:
    return P.DeleteServerGroupRequest(id=await _group_in_a(world))


async def _grant_service_role(world: World) -> message.Message:
    """The service role is cloud-wide: only a cloud-admin may grant it."""
    user_id = await world.make_user(f"svc-{uuid.uuid4().hex[:6]}", world.project_a, "reader")
    return identity_pb2.GrantRoleRequest(user_id=user_id, project_id="", role="service")


def _only_own_groups(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, P.ListServerGroupsResponse)
    projects = {group.meta.project_id for group in reply.server_groups}
    if caller.startswith("a_"):
        assert projects == {world.project_a}
    else:
        # Another project, or a cloud admin not asking for all_projects: own project only.
        assert world.project_a not in projects


def _services_too() -> dict[str, grpc.StatusCode]:
    return {**cloud_only(), "service": OK}


add_rows(
    Row(SERVICE, "ListNodes", _list_nodes, _services_too()),
    Row(SERVICE, "GetNode", _get_node, _services_too()),
    Row(SERVICE, "UpdateNode", _update_node, {**cloud_only(), "service": DENIED}),
    Row(SERVICE, "GetDefaultAllocationRatios", _get_default_ratios, _services_too()),
    Row(SERVICE, "UpdateDefaultAllocationRatios", _update_default_ratios,
        {**cloud_only(), "service": DENIED}),
    Row(SERVICE, "SelectDestinations", _select, _services_too()),
    Row(SERVICE, "GetAllocations", _get_allocations, _services_too()),
    Row(SERVICE, "ReleaseAllocations", _release, _services_too()),
    Row(SERVICE, "MoveAllocations", _move, _services_too()),
    Row(SERVICE, "CreateServerGroup", _create_group, project_write()),
    Row(SERVICE, "CreateServerGroup", _create_own_group,
        expect(a_reader=DENIED), case="own-project"),
    Row(SERVICE, "GetServerGroup", _get_group, project_read()),
    Row(SERVICE, "ListServerGroups", _list_groups, expect(), check=_only_own_groups),
    Row(SERVICE, "ListServerGroups", _list_all_groups,
        expect(a_admin=DENIED, a_member=DENIED, a_reader=DENIED, b_admin=DENIED),
        case="all-projects"),
    Row(SERVICE, "DeleteServerGroup", _delete_group, project_write()),
    Row("nubis.identity.v1.IdentityService", "GrantRole", _grant_service_role, cloud_only(),
        case="service-role"),
    # The service role opens no project RPC: it ranks nowhere among project roles.
    Row(SERVICE, "GetServerGroup", _get_group, {**project_read(), "service": DENIED},
        case="service-caller"),
)

