"""Authorization rows of ComputeService's moves and hot-plug verbs.

Members of an instance's project resize it, confirm or revert the resize,
rebuild it and plug volumes and ports in and out; readers may not; another
project gets NOT_FOUND. Migrating, live-migrating and evacuating are cloud-admin calls.
The instances are written straight into the store (the world runs no agents)
in a state the verb refuses as FAILED_PRECONDITION: that code shows the
policy let the caller through, and no operation starts that would wait on a node.
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2, instance_pb2, instance_verbs_pb2

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
    expect,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.compute.v1.ComputeService"
NODE = "authz-compute-node"
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
Instance = instance_pb2.Instance
V = instance_verbs_pb2


async def _start(world: World) -> Service:
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


if SERVICE not in SERVICES:
    add_service(SERVICE, _start)


async def _instance_in_a(world: World, state: int) -> str:
    """An idle instance record of project A in `state` on a node."""
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=f"i-{uuid.uuid4().hex[:6]}"),
                                world.project_a)
    made = Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                    node=NODE)
    made.state = state  # type: ignore[assignment]
    await world.store.create(keys.instance(meta.id), made)
    return meta.id


async def _public_flavor(world: World) -> str:
    made = flavor_pb2.Flavor(meta=resources.fresh_meta(resource_pb2.ResourceMeta(
        name=f"authz-{uuid.uuid4().hex[:6]}")), state=flavor_pb2.Flavor.ACTIVE, vcpus=1,
        ram_mb=128, disk_gb=1, is_public=True)
    await world.store.create(keys.flavor(made.meta.id), made)
    return made.meta.id


def _members_refused() -> dict[str, grpc.StatusCode]:
    """Members of A get past the policy to the state check; readers are denied; B sees nothing."""
    return expect(cloud_admin=REFUSED, a_admin=REFUSED, a_member=REFUSED, a_reader=DENIED,
                  b_admin=HIDDEN)


def _operators_refused() -> dict[str, grpc.StatusCode]:
    """Only cloud-admins get past the policy (to the state check)."""
    return expect(cloud_admin=REFUSED, a_admin=DENIED, a_member=DENIED, a_reader=DENIED,
                  b_admin=DENIED)


async def _resize_error(world: World) -> message.Message:
    return V.ResizeInstanceRequest(id=await _instance_in_a(world, Instance.ERROR),
                                   flavor_id=await _public_flavor(world))


async def _confirm_active(world: World) -> message.Message:
    return V.ConfirmResizeRequest(id=await _instance_in_a(world, Instance.ACTIVE))


async def _revert_active(world: World) -> message.Message:
    return V.RevertResizeRequest(id=await _instance_in_a(world, Instance.ACTIVE))


async def _migrate_error(world: World) -> message.Message:
    return V.MigrateInstanceRequest(id=await _instance_in_a(world, Instance.ERROR))


async def _live_migrate_stopped(world: World) -> message.Message:
    return V.LiveMigrateInstanceRequest(id=await _instance_in_a(world, Instance.STOPPED))


async def _evacuate_building(world: World) -> message.Message:
    return V.EvacuateInstanceRequest(id=await _instance_in_a(world, Instance.BUILDING),
                                     force=True)


async def _rebuild_building(world: World) -> message.Message:
    return V.RebuildInstanceRequest(id=await _instance_in_a(world, Instance.BUILDING))


async def _attach_volume_error(world: World) -> message.Message:
    return V.AttachVolumeRequest(instance_id=await _instance_in_a(world, Instance.ERROR),
                                 volume_id=str(uuid.uuid4()))


async def _detach_volume_error(world: World) -> message.Message:
    return V.DetachVolumeRequest(instance_id=await _instance_in_a(world, Instance.ERROR),
                                 volume_id=str(uuid.uuid4()))


async def _attach_port_error(world: World) -> message.Message:
    return V.AttachPortRequest(instance_id=await _instance_in_a(world, Instance.ERROR),
                               network=instance_pb2.NetworkRequest(network_id=str(uuid.uuid4())))


async def _detach_port_error(world: World) -> message.Message:
    return V.DetachPortRequest(instance_id=await _instance_in_a(world, Instance.ERROR),
                               port_id=str(uuid.uuid4()))


add_rows(
    Row(SERVICE, "ResizeInstance", _resize_error, _members_refused(), case="ERROR"),
    Row(SERVICE, "ConfirmResize", _confirm_active, _members_refused(), case="ACTIVE"),
    Row(SERVICE, "RevertResize", _revert_active, _members_refused(), case="ACTIVE"),
    Row(SERVICE, "MigrateInstance", _migrate_error, _operators_refused(), case="ERROR"),
    Row(SERVICE, "LiveMigrateInstance", _live_migrate_stopped, _operators_refused(),
        case="STOPPED"),
    Row(SERVICE, "EvacuateInstance", _evacuate_building, _operators_refused(),
        case="BUILDING"),
    Row(SERVICE, "RebuildInstance", _rebuild_building, _members_refused(), case="BUILDING"),
    Row(SERVICE, "AttachVolume", _attach_volume_error, _members_refused(), case="ERROR"),
    Row(SERVICE, "DetachVolume", _detach_volume_error, _members_refused(), case="ERROR"),
    Row(SERVICE, "AttachPort", _attach_port_error, _members_refused(), case="ERROR"),
    Row(SERVICE, "DetachPort", _detach_port_error, _members_refused(), case="ERROR"),
)
