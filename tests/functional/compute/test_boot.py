"""Booting servers end to end on the libvirt test driver, and deleting them without a trace."""

from __future__ import annotations

import asyncio

from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_action_pb2
from nubis.storage.v1 import volume_pb2

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, bare_cloud, cloud
from tests.functional.storage import volume_harness

__all__ = ["bare_cloud", "cloud"]


def _storage_calls(cloud: ComputeCloud) -> dict[str, float]:
    """The RPCs storage served, by method name, from its own metrics."""
    assert cloud.base.storage is not None
    calls: dict[str, float] = {}
    for family in cloud.base.storage.running.registry.collect():
        for sample in family.samples:
            if sample.name == "nubis_rpc_handled_total":
                method = sample.labels["method"].rsplit("/", 1)[-1]
                calls[method] = calls.get(method, 0) + sample.value
    return calls


async def test_one_server_boots_and_deletes(cloud: ComputeCloud) -> None:
    before = _storage_calls(cloud)
    made = await cloud.create()
    assert made.state == Instance.BUILDING
    found = await cloud.wait_final(made.meta.id, 120)  # the first boot fetches the image
    assert found.state == Instance.ACTIVE, found.fault.message
    assert found.power_state == Instance.POWER_STATE_RUNNING
    assert found.node and found.root_volume_id and found.addresses
    assert await cloud.domain_state(found.node, found.meta.id) == "running"
    calls = {method: count - before.get(method, 0)
             for method, count in _storage_calls(cloud).items()}
    # The root disk is made reserved as vda and begun by storage: no ReserveVolume or
    # BeginAttach, one CompleteAttach after the spawn.
    assert (calls.get("CreateRootDisk"), calls.get("CompleteAttach")) == (1, 1), calls
    assert not calls.get("ReserveVolume") and not calls.get("BeginAttach"), calls
    root = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(
        id=found.root_volume_id), metadata=cloud.admin)
    assert root.state == volume_pb2.Volume.IN_USE
    assert [ref.attachment_id for ref in root.attachments] == [found.volumes[0].attachment_id]
    await cloud.delete(found.meta.id)
    await cloud.wait_gone(found.meta.id)
    left = await cloud.wait_clean([found.meta.id])
    assert left.empty(), left


async def test_twenty_concurrent_servers_on_two_agents(cloud: ComputeCloud) -> None:
    made = await asyncio.gather(*(cloud.create() for _ in range(20)))
    found = await asyncio.gather(*(cloud.wait_final(m.meta.id, 120) for m in made))
    faults = [f.fault.message for f in found if f.state != Instance.ACTIVE]
    assert not faults, faults
    for server in found:  # each domain asked of its node's agent
        assert await cloud.domain_state(server.node, server.meta.id) == "running"
    assert {server.node for server in found} == set(NODES)
    ids = [server.meta.id for server in found]
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left



async def test_a_server_boots_from_a_bootable_volume_on_its_node(cloud: ComputeCloud) -> None:
    for node in NODES:  # a volume in each node's pool: its server must land there
        volume = await cloud.base.stub().CreateVolume(volume_pb2.CreateVolumeRequest(
            volume=volume_pb2.Volume(meta=resource_pb2.ResourceMeta(name=f"boot-{node}"),
                                     size_gb=1, source_image_id=cloud.image_id, node=node)),
            metadata=cloud.admin)
        await volume_harness.wait_state(cloud.base.stub(), volume.meta.id, cloud.admin,
                                        {volume_pb2.Volume.AVAILABLE})
        shape = cloud.server()
        shape.ClearField("image_id")
        shape.boot_volume_id = volume.meta.id
        made = await cloud.create(shape)
        found = await cloud.wait_final(made.meta.id)
        assert found.state == Instance.ACTIVE, found.fault.message
        assert found.node == node and found.root_volume_id == volume.meta.id
        actions = await cloud.stub().ListInstanceActions(
            instance_action_pb2.ListInstanceActionsRequest(instance_id=made.meta.id),
            metadata=cloud.admin)  # placed there at once, not after failing elsewhere
        assert "reschedule" not in [e.name for a in actions.actions for e in a.events]
        assert [(v.volume_id, v.boot, v.delete_on_termination) for v in found.volumes] == [
            (volume.meta.id, True, False)]
        assert await cloud.domain_state(node, made.meta.id) == "running"
        in_use = await cloud.base.stub().GetVolume(
            volume_pb2.GetVolumeRequest(id=volume.meta.id), metadata=cloud.admin)
        assert in_use.state == volume_pb2.Volume.IN_USE
        await cloud.delete(made.meta.id)
        await cloud.wait_gone(made.meta.id)
        kept = await cloud.base.stub().GetVolume(
            volume_pb2.GetVolumeRequest(id=volume.meta.id), metadata=cloud.admin)
        assert kept.state == volume_pb2.Volume.AVAILABLE  # the caller's: detached, not deleted
        assert not [d for d in await cloud.domains(node) if d.name.startswith("instance-")]
