"""Hot-plug through real agents: a volume and NICs plugged into and out of a running domain
(its disks and MACs asked of the node's libvirt), storage's refusal of a volume on another
node, the root volume never detached, a deleted server's volume kept and detached, and ports
compute made deleted on detach."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.network.v1 import port_pb2
from nubis.storage.v1 import volume_pb2

from services.common import tasks
from tests.functional.compute.harness import NODES, ComputeCloud, Instance, cloud
from tests.functional.compute.test_migrate import reason
from tests.functional.compute.test_resize import booted, follow

__all__ = ["cloud"]


async def domain(cloud: ComputeCloud, server: Instance) -> tasks_pb2.DomainStatus:
    """The server's domain as its node's libvirt defines it."""
    reply: tasks_pb2.DomainStatus = await cloud.base.sender.send(
        server.node, tasks.DOMAIN_STATUS,
        tasks_pb2.DomainStatusRequest(name=f"instance-{server.meta.id}"),
        operation_id=tasks.new_operation_id())
    return reply


async def volume_on(cloud: ComputeCloud, node: str) -> str:
    made = await cloud.base.stub().CreateVolume(volume_pb2.CreateVolumeRequest(
        volume=volume_pb2.Volume(meta=resource_pb2.ResourceMeta(name="data"), size_gb=1,
                                 node=node)), metadata=cloud.admin)
    async with asyncio.timeout(30):
        while True:
            found = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(
                id=made.meta.id), metadata=cloud.admin)
            if found.state == volume_pb2.Volume.AVAILABLE:
                return str(made.meta.id)
            await asyncio.sleep(0.1)


async def idle(cloud: ComputeCloud, server: Instance) -> Instance:
    found, _ = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.STOPPED,
                                                    Instance.ERROR))
    return found


async def volume_state(cloud: ComputeCloud, volume_id: str) -> int:
    found = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=volume_id),
                                              metadata=cloud.admin)
    return int(found.state)


async def test_volume_attach_and_detach(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub = cloud.stub()
    here = await volume_on(cloud, server.node)
    started = await stub.AttachVolume(V.AttachVolumeRequest(
        instance_id=server.meta.id, volume_id=here), metadata=cloud.admin)
    assert started.task_state == Instance.TASK_STATE_ATTACHING_VOLUME
    found = await idle(cloud, server)
    assert found.state == Instance.ACTIVE and not found.fault.message, found.fault.message
    assert [(v.volume_id, v.device_name) for v in found.volumes[1:]] == [(here, "vdb")]
    assert "vdb" in (await domain(cloud, found)).disk_targets
    assert await volume_state(cloud, here) == volume_pb2.Volume.IN_USE

    with pytest.raises(grpc.aio.AioRpcError) as root:
        await stub.DetachVolume(V.DetachVolumeRequest(
            instance_id=server.meta.id, volume_id=found.root_volume_id), metadata=cloud.admin)
    assert root.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(root.value) == "nubis.instance.root_volume"

    await stub.DetachVolume(V.DetachVolumeRequest(instance_id=server.meta.id, volume_id=here),
                            metadata=cloud.admin)
    found = await idle(cloud, server)
    assert [v.volume_id for v in found.volumes] == [found.root_volume_id]
    assert "vdb" not in (await domain(cloud, found)).disk_targets
    assert await volume_state(cloud, here) == volume_pb2.Volume.AVAILABLE


async def test_deleting_a_server_detaches_its_volume_and_keeps_it(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    here = await volume_on(cloud, server.node)
    await cloud.stub().AttachVolume(V.AttachVolumeRequest(
        instance_id=server.meta.id, volume_id=here), metadata=cloud.admin)
    found = await idle(cloud, server)
    assert [v.volume_id for v in found.volumes[1:]] == [here], found.fault.message
    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    kept = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=here),
                                             metadata=cloud.admin)
    assert kept.state == volume_pb2.Volume.AVAILABLE and not kept.attachments


async def test_volume_of_another_node_is_refused_by_storage(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    there = await volume_on(cloud, next(node for node in NODES if node != server.node))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.stub().AttachVolume(V.AttachVolumeRequest(
            instance_id=server.meta.id, volume_id=there), metadata=cloud.admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(refused.value) == "nubis.volume.other_node"
    found = await cloud.get(server.meta.id)
    assert found is not None and not found.task_id and len(found.volumes) == 1
    assert await volume_state(cloud, there) == volume_pb2.Volume.AVAILABLE


async def test_ports_attach_and_detach(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub, net = cloud.stub(), cloud.network_stub()
    await stub.AttachPort(V.AttachPortRequest(
        instance_id=server.meta.id,
        network=instance_pb2.NetworkRequest(network_id=cloud.network_id)), metadata=cloud.admin)
    found = await idle(cloud, server)
    assert len(found.port_ids) == 2, found.fault.message
    made = found.port_ids[1]
    port = await net.GetPort(port_pb2.GetPortRequest(id=made), metadata=cloud.admin)
    assert port.node == server.node and port.device_id == server.meta.id
    assert port.mac_address in (await domain(cloud, found)).interface_macs
    assert len({a.port_id for a in found.addresses}) == 2

    own = await net.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        network_id=cloud.network_id)), metadata=cloud.admin)
    await stub.AttachPort(V.AttachPortRequest(
        instance_id=server.meta.id, network=instance_pb2.NetworkRequest(port_id=own.meta.id)),
        metadata=cloud.admin)
    found = await idle(cloud, server)
    assert list(found.port_ids[1:]) == [made, own.meta.id], found.fault.message

    for port_id in (made, own.meta.id):
        await stub.DetachPort(V.DetachPortRequest(instance_id=server.meta.id, port_id=port_id),
                              metadata=cloud.admin)
        found = await idle(cloud, server)
        assert port_id not in found.port_ids, found.fault.message
    assert len(found.port_ids) == 1
    assert len((await domain(cloud, found)).interface_macs) == 1
    with pytest.raises(grpc.aio.AioRpcError) as gone:  # compute made it: deleted
        await net.GetPort(port_pb2.GetPortRequest(id=made), metadata=cloud.admin)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    kept = await net.GetPort(port_pb2.GetPortRequest(id=own.meta.id), metadata=cloud.admin)
    assert not kept.node and not kept.device_id  # the caller's: unbound, kept

    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    await net.DeletePort(port_pb2.DeletePortRequest(id=own.meta.id), metadata=cloud.admin)
    assert (await cloud.wait_clean([server.meta.id])).empty()
