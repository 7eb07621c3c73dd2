"""Volumes made real in a node's libvirt pool, checked through the agent; states, extend, delete."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import volume_pb2

from tests.functional.storage.volume_harness import GIB, NODES, VolumeCloud, wait_gone, wait_state

Volume = volume_pb2.Volume


def new_volume(name: str, size_gb: int = 1, **fields: object) -> volume_pb2.CreateVolumeRequest:
    return volume_pb2.CreateVolumeRequest(volume=Volume(
        meta=resource_pb2.ResourceMeta(name=name), size_gb=size_gb, **fields))  # type: ignore[arg-type]


async def test_a_volume_exists_in_its_nodes_pool_with_its_capacity_and_is_gone_after_delete(
    cloud: VolumeCloud,
) -> None:
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("data", 3, node=NODES[1]), metadata=cloud.admin)
    assert made.state == Volume.CREATING and made.node == NODES[1]
    ready = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE, Volume.ERROR})
    assert ready.state == Volume.AVAILABLE, ready.fault

    seen = await cloud.ask_agent(NODES[1], ready.libvirt_name, ready.pool_name)
    assert seen.found and seen.volume.capacity_bytes == 3 * GIB
    assert not (await cloud.ask_agent(NODES[0], ready.libvirt_name, ready.pool_name)).found

    deleting = await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id),
                                       metadata=cloud.admin)
    assert deleting.state == Volume.DELETING
    await wait_gone(stub, made.meta.id, cloud.admin)
    assert not (await cloud.ask_agent(NODES[1], ready.libvirt_name, ready.pool_name)).found


async def test_a_volume_without_a_named_pool_is_in_its_nodes_own_pool(
    cloud: VolumeCloud,
) -> None:
    # libvirt's test driver gives every node a huge default-pool beside the
    # node's own; volumes go to the node's own pool unless a pool is named.
    stub = cloud.stub()
    on_node = await stub.CreateVolume(new_volume("own", 1, node=NODES[0]), metadata=cloud.admin)
    anywhere = await stub.CreateVolume(new_volume("any", 1), metadata=cloud.admin)
    for made in (on_node, anywhere):
        ready = await wait_state(stub, made.meta.id, cloud.admin,
                                 {Volume.AVAILABLE, Volume.ERROR})
        assert ready.state == Volume.AVAILABLE, ready.fault
        assert ready.pool_name == "nubis"
        # Asked of the node's libvirt: in the node's own pool ("" = that pool), not the other.
        seen = await cloud.ask_agent(ready.node, ready.libvirt_name)
        assert seen.found and seen.volume.pool == "nubis"
        assert seen.volume.capacity_bytes == GIB
        assert not (await cloud.ask_agent(ready.node, ready.libvirt_name, "default-pool")).found


async def test_extend_grows_the_libvirt_volume_and_never_shrinks(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("grow", 1), metadata=cloud.admin)
    ready = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
    assert ready.node in NODES
    with pytest.raises(grpc.aio.AioRpcError) as shrink:
        await stub.ExtendVolume(volume_pb2.ExtendVolumeRequest(id=made.meta.id, new_size_gb=1),
                                metadata=cloud.admin)
    assert shrink.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    extending = await stub.ExtendVolume(
        volume_pb2.ExtendVolumeRequest(id=made.meta.id, new_size_gb=4), metadata=cloud.admin)
    assert extending.state == Volume.EXTENDING
    grown = await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
    assert grown.size_gb == 4
    seen = await cloud.ask_agent(grown.node, grown.libvirt_name, grown.pool_name)
    assert seen.volume.capacity_bytes == 4 * GIB


async def test_update_and_reset_state(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    made = await stub.CreateVolume(new_volume("named", 1), metadata=cloud.admin)
    await wait_state(stub, made.meta.id, cloud.admin, {Volume.AVAILABLE})
    renamed = await stub.UpdateVolume(volume_pb2.UpdateVolumeRequest(
        volume=Volume(meta=resource_pb2.ResourceMeta(id=made.meta.id, name="renamed",
                                                     labels={"tier": "gold"})),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.name", "meta.labels"])),
        metadata=cloud.admin)
    assert renamed.meta.name == "renamed" and dict(renamed.meta.labels) == {"tier": "gold"}
    reset = await stub.ResetVolumeState(volume_pb2.ResetVolumeStateRequest(
        id=made.meta.id, state=Volume.ERROR), metadata=cloud.admin)
    assert reset.state == Volume.ERROR and reset.fault.reason == "nubis.volume.reset"


async def test_a_create_retried_with_its_request_id_makes_one_volume(cloud: VolumeCloud) -> None:
    stub = cloud.stub()
    ask = new_volume("once", 1)
    ask.request_id = "create-once-1"
    first, second = await stub.CreateVolume(ask, metadata=cloud.admin), \
        await stub.CreateVolume(ask, metadata=cloud.admin)
    assert first.meta.id == second.meta.id
    listed = await stub.ListVolumes(volume_pb2.ListVolumesRequest(filter="name=once"),
                                    metadata=cloud.admin)
    assert [volume.meta.id for volume in listed.volumes] == [first.meta.id]
    other = new_volume("other", 1)
    other.request_id = "create-once-1"
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await stub.CreateVolume(other, metadata=cloud.admin)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
