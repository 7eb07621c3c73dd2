"""Authorization rows of ComputeService's power verbs, reset-state, console log and watch.

Instances belong to projects: members start, stop and reboot them, readers
read their console and watch them, another project gets NOT_FOUND (the watch
shows it nothing), and only cloud-admins reset an instance's state. The
instances are written straight into the store (the world runs no agents), in
a state the verb refuses as FAILED_PRECONDITION: that code shows the policy
let the caller through, and no operation starts that would wait on a node.
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2, instance_requests_pb2, instance_verbs_pb2

from services.common import resources
from services.common.settings import ServiceEndpoint
from services.compute import keys, main
from tests.functional.authz.table import (
    DENIED,
    HIDDEN,
    SERVICES,
    Row,
    add_rows,
    add_service,
    cloud_only,
    expect,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.compute.v1.ComputeService"
NODE = "authz-compute-node"
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
BAD = grpc.StatusCode.INVALID_ARGUMENT
Instance = instance_pb2.Instance
V = instance_verbs_pb2


async def _start(world: World) -> Service:
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


if SERVICE not in SERVICES:
    add_service(SERVICE, _start)


async def _instance_in_a(world: World, state: int, node: str = NODE) -> str:
    """An idle instance record of project A in `state` (on `node`)."""
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=f"i-{uuid.uuid4().hex[:6]}"),
                                world.project_a)
    made = Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                    node=node, power_state=Instance.POWER_STATE_RUNNING)
    made.state = state  # type: ignore[assignment]
    await world.store.create(keys.instance(meta.id), made)
    return meta.id


def _members_refused() -> dict[str, grpc.StatusCode]:
    """Members of A get past the policy to the state check; readers are denied; B sees nothing."""
    return expect(cloud_admin=REFUSED, a_admin=REFUSED, a_member=REFUSED, a_reader=DENIED,
                  b_admin=HIDDEN)


async def _start_active(world: World) -> message.Message:
    return V.StartInstanceRequest(id=await _instance_in_a(world, Instance.ACTIVE))


async def _stop_stopped(world: World) -> message.Message:
    return V.StopInstanceRequest(id=await _instance_in_a(world, Instance.STOPPED))


async def _reboot_stopped(world: World) -> message.Message:
    return V.RebootInstanceRequest(id=await _instance_in_a(world, Instance.STOPPED),
                                   type=V.RebootInstanceRequest.REBOOT_TYPE_SOFT)


async def _reset(world: World) -> message.Message:
    return V.ResetInstanceStateRequest(id=await _instance_in_a(world, Instance.ERROR),
                                       state=Instance.ERROR)


async def _console_unplaced(world: World) -> message.Message:
    return V.GetConsoleLogRequest(id=await _instance_in_a(world, Instance.BUILDING, node=""))


async def _watch(world: World) -> message.Message:
    await _instance_in_a(world, Instance.ACTIVE)
    request = instance_requests_pb2.WatchInstancesRequest()
    request.options.initial_state = True
    return request


def _no_foreign_instance(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, instance_requests_pb2.InstanceEvent)
    own = {"a_admin": world.project_a, "a_member": world.project_a, "a_reader": world.project_a,
           "b_admin": world.project_b}.get(caller)
    if own is not None and reply.HasField("instance"):
        assert reply.instance.meta.project_id == own, caller
        assert not reply.instance.node, "placement shown to a project"


async def _watch_all_bad(world: World) -> message.Message:
    request = instance_requests_pb2.WatchInstancesRequest(filter="no-such-key=1")
    request.options.all_projects = True
    return request


add_rows(
    Row(SERVICE, "StartInstance", _start_active, _members_refused(), case="ACTIVE"),
    Row(SERVICE, "StopInstance", _stop_stopped, _members_refused(), case="STOPPED"),
    Row(SERVICE, "RebootInstance", _reboot_stopped, _members_refused(), case="STOPPED"),
    Row(SERVICE, "ResetInstanceState", _reset, cloud_only()),
    Row(SERVICE, "GetConsoleLog", _console_unplaced,
        expect(cloud_admin=REFUSED, a_admin=REFUSED, a_member=REFUSED, a_reader=REFUSED,
               b_admin=HIDDEN), case="on no node"),
    Row(SERVICE, "WatchInstances", _watch, expect(), check=_no_foreign_instance),
    Row(SERVICE, "WatchInstances", _watch_all_bad,
        expect(cloud_admin=BAD, a_admin=DENIED, a_member=DENIED, a_reader=DENIED,
               b_admin=DENIED), case="all_projects"),
)
