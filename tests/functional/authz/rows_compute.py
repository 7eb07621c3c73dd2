"""Authorization rows of ComputeService's instance standard methods and instance actions.

Readers of project A get and list its instances and their actions, members
create, update and delete them, project B gets NOT_FOUND (a list shows it
none of A's). Instances are written straight into the store (the world runs
no agents). A create names a flavor that does not exist: NOT_FOUND shows the
policy let the caller through, and no build starts that would need a node.
"""

from __future__ import annotations

import uuid

from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_action_pb2, instance_pb2, instance_requests_pb2

from services.common import resources
from services.common.settings import ServiceEndpoint
from services.compute import action, keys, main
from tests.functional.authz.table import (
    DENIED,
    HIDDEN,
    SERVICES,
    Row,
    add_rows,
    add_service,
    expect,
    project_read,
    project_write,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.compute.v1.ComputeService"
Instance = instance_pb2.Instance
R = instance_requests_pb2


async def _start(world: World) -> Service:
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


if SERVICE not in SERVICES:
    add_service(SERVICE, _start)


async def _instance_in_a(world: World, state: int = Instance.ERROR) -> Instance:
    """An idle instance record of project A on no node (nothing to tear down on an agent)."""
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=f"i-{uuid.uuid4().hex[:6]}"),
                                world.project_a)
    made = Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                    quota_released=True)
    made.state = state  # type: ignore[assignment]
    await world.store.create(keys.instance(meta.id), made)
    return made


async def _get(world: World) -> message.Message:
    return R.GetInstanceRequest(id=(await _instance_in_a(world)).meta.id)


async def _list(world: World) -> message.Message:
    await _instance_in_a(world)
    return R.ListInstancesRequest()


def _own_only(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, R.ListInstancesResponse)
    own = {"a_admin": world.project_a, "a_member": world.project_a, "a_reader": world.project_a,
           "b_admin": world.project_b}.get(caller)
    if own is not None:
        assert all(i.meta.project_id == own for i in reply.instances), caller
        assert not any(i.node or i.domain_name for i in reply.instances), caller


async def _create(world: World) -> message.Message:
    shape = Instance(meta=resource_pb2.ResourceMeta(name="authz-vm"),
                     flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()))
    shape.networks.add(network_id=str(uuid.uuid4()))
    return R.CreateInstanceRequest(instance=shape)


async def _update(world: World) -> message.Message:
    found = await _instance_in_a(world)
    change = Instance(meta=resource_pb2.ResourceMeta(id=found.meta.id, labels={"k": "v"}))
    return R.UpdateInstanceRequest(instance=change,
                                   update_mask=field_mask_pb2.FieldMask(paths=["meta.labels"]))


async def _delete(world: World) -> message.Message:
    return R.DeleteInstanceRequest(id=(await _instance_in_a(world)).meta.id)


async def _action_in_a(world: World) -> tuple[str, str]:
    found = await _instance_in_a(world)
    record = action.new(found, "create", None, "authz")
    await world.store.create(keys.action(found.meta.id, record.meta.id), record)
    return found.meta.id, record.meta.id


async def _list_actions(world: World) -> message.Message:
    instance_id, _ = await _action_in_a(world)
    return instance_action_pb2.ListInstanceActionsRequest(instance_id=instance_id)


async def _get_action(world: World) -> message.Message:
    instance_id, action_id = await _action_in_a(world)
    return instance_action_pb2.GetInstanceActionRequest(instance_id=instance_id, id=action_id)


add_rows(
    Row(SERVICE, "GetInstance", _get, project_read()),
    Row(SERVICE, "ListInstances", _list, expect(), check=_own_only),
    Row(SERVICE, "CreateInstance", _create,
        expect(cloud_admin=HIDDEN, a_admin=HIDDEN, a_member=HIDDEN, a_reader=DENIED,
               b_admin=HIDDEN), case="unknown flavor"),
    Row(SERVICE, "UpdateInstance", _update, project_write()),
    Row(SERVICE, "DeleteInstance", _delete, project_write()),
    Row(SERVICE, "ListInstanceActions", _list_actions, project_read()),
    Row(SERVICE, "GetInstanceAction", _get_action, project_read()),
)
