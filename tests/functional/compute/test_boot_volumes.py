"""Servers booted with existing volumes (`block_devices` of `volume_id`) through real agents:
the domain starts with the disks, the volumes IN_USE while it lives and AVAILABLE after its
delete or a failed build; bad references refused with the field named and nothing claimed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from nubis.compute.v1 import instance_requests_pb2 as R
from nubis.storage.v1 import volume_pb2

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, bare_cloud, cloud
from tests.functional.compute.test_build_failures import REFUSES
from tests.functional.compute.test_hotplug import domain, volume_on, volume_state
from tests.functional.compute.test_recovery import _kill_in_flight, until_mid_build

__all__ = ["bare_cloud", "cloud"]
AVAILABLE = volume_pb2.Volume.AVAILABLE


def with_volumes(cloud: ComputeCloud, *volume_ids: str, device: str = "") -> Instance:
    made = cloud.server()
    for volume_id in volume_ids:
        made.block_devices.add(volume_id=volume_id, device_name=device)
    return made


async def refused(cloud: ComputeCloud, made: Instance) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.create(made)
    listed = await cloud.stub().ListInstances(R.ListInstancesRequest(), metadata=cloud.admin)
    assert not [i for i in listed.instances if i.meta.name == made.meta.name]
    return caught.value


async def test_a_server_boots_with_two_volumes_and_its_delete_keeps_them(
        cloud: ComputeCloud) -> None:
    node = NODES[0]
    first, second = await volume_on(cloud, node), await volume_on(cloud, node)
    made = await cloud.create(with_volumes(cloud, first, second))
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    assert found.node == node  # the volumes' node: local storage
    assert [(v.volume_id, v.device_name) for v in found.volumes[1:]] == [
        (first, "vdb"), (second, "vdc")]
    targets = (await domain(cloud, found)).disk_targets
    assert {"vda", "vdb", "vdc"} <= set(targets), targets
    for volume_id in (first, second):
        assert await volume_state(cloud, volume_id) == volume_pb2.Volume.IN_USE
    await cloud.delete(found.meta.id)
    await cloud.wait_gone(found.meta.id)
    assert not [d for d in await cloud.domains(node) if d.name.endswith(found.meta.id)]
    for volume_id in (first, second):
        kept = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=volume_id),
                                                 metadata=cloud.admin)
        assert kept.state == AVAILABLE and not kept.attachments


async def test_missing_in_use_duplicate_and_split_volumes_are_refused(
        cloud: ComputeCloud) -> None:
    here = await volume_on(cloud, NODES[0])
    missing = "00000000-0000-4000-8000-000000000000"
    error = await refused(cloud, with_volumes(cloud, here, missing))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "instance.block_devices[1].volume_id" in (error.details() or "")

    error = await refused(cloud, with_volumes(cloud, here, here))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.block_devices[1].volume_id" in (error.details() or "")

    error = await refused(cloud, with_volumes(cloud, here, device="sdb"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.block_devices[0].device_name" in (error.details() or "")

    there = await volume_on(cloud, NODES[1])
    error = await refused(cloud, with_volumes(cloud, here, there))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.block_devices" in (error.details() or "")

    made = cloud.server()
    made.block_devices.add(image_id=cloud.image_id)
    error = await refused(cloud, made)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.block_devices[0].image_id" in (error.details() or "")
    assert "only volume_id" in (error.details() or "")

    server = await cloud.create(with_volumes(cloud, here))
    found = await cloud.wait_final(server.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    error = await refused(cloud, with_volumes(cloud, here))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "instance.block_devices[0].volume_id" in (error.details() or "")
    await cloud.delete(found.meta.id)
    await cloud.wait_gone(found.meta.id)
    for volume_id in (here, there):
        assert await volume_state(cloud, volume_id) == AVAILABLE


async def test_a_build_the_agent_refuses_gives_the_volumes_back(cloud: ComputeCloud) -> None:
    node = NODES[0]
    here = await volume_on(cloud, node)
    await cloud.restart_agent(node, **REFUSES)
    made = await cloud.create(with_volumes(cloud, here))
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ERROR
    assert "build failed at spawn" in found.fault.message, found.fault.message
    assert not found.volumes
    kept = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=here),
                                             metadata=cloud.admin)
    assert kept.state == AVAILABLE and not kept.attachments
    left = await cloud.wait_clean([found.meta.id])
    assert left.empty(), left
    await cloud.delete(found.meta.id)
    await cloud.wait_gone(found.meta.id)


async def test_a_server_deleted_while_building_gives_its_volumes_back(
        cloud: ComputeCloud) -> None:
    here = await volume_on(cloud, NODES[0])
    made = await cloud.create(with_volumes(cloud, here))
    await asyncio.sleep(0.2)  # the build is under way, perhaps at its block-device step
    await cloud.delete(made.meta.id)
    await cloud.wait_gone(made.meta.id)
    kept = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=here),
                                             metadata=cloud.admin)
    assert kept.state == AVAILABLE and not kept.attachments


async def test_builds_adopted_after_a_compute_kill_attach_each_volume_once(
        bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    volumes = await asyncio.gather(*(volume_on(cloud, NODES[0]) for _ in range(4)))
    stub = cloud.stub()
    made = await asyncio.gather(*(cloud.create(with_volumes(cloud, v), stub=stub)
                                  for v in volumes))
    await until_mid_build(cloud, [m.meta.id for m in made])
    await _kill_in_flight(cloud, first)
    cloud.start_compute_process()  # the same address; it adopts what the dead one ran
    found = await asyncio.gather(*(cloud.wait_final(m.meta.id, 90) for m in made))
    for server, volume_id in zip(found, volumes, strict=True):
        assert server.state == Instance.ACTIVE, server.fault.message
        assert [v.volume_id for v in server.volumes[1:]] == [volume_id]
        held = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=volume_id),
                                                 metadata=cloud.admin)
        assert held.state == volume_pb2.Volume.IN_USE and len(held.attachments) == 1
    await asyncio.gather(*(cloud.delete(m.meta.id) for m in made))
    await asyncio.gather(*(cloud.wait_gone(m.meta.id) for m in made))
    for volume_id in volumes:
        assert await volume_state(cloud, volume_id) == AVAILABLE
