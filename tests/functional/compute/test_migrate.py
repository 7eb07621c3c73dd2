"""Cold migration (to VERIFY_RESIZE, then confirm), live migration refused on the test driver
before anything changes, and evacuation of a server whose node went DOWN (an agent stopped)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.network.v1 import port_pb2
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import volume_pb2

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, cloud
from tests.functional.compute.test_resize import OLD, booted, exact, follow, node_usage

__all__ = ["cloud"]


def reason(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a refused call."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


async def test_cold_migration_ends_in_verify_resize_then_confirms(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    source = server.node
    target = next(node for node in NODES if node != source)
    started = await cloud.stub().MigrateInstance(
        V.MigrateInstanceRequest(id=server.meta.id, target_node=target), metadata=cloud.admin)
    assert started.state == Instance.MIGRATING
    found, seen = await follow(cloud, server.meta.id, (Instance.VERIFY_RESIZE, Instance.ACTIVE,
                                                       Instance.ERROR))
    assert found.state == Instance.VERIFY_RESIZE, found.fault.message
    for _, held in seen:
        assert held in ({source: OLD}, {source: OLD, target: OLD}), held
    assert found.node == target and found.flavor_id == server.flavor_id
    assert found.migration.kind == found.migration.KIND_COLD_MIGRATION
    assert await exact(cloud, server.meta.id) == {source: OLD, target: OLD}
    assert await cloud.domain_state(target, server.meta.id) == "running"
    ports = await cloud.network_stub().ListPorts(port_pb2.ListPortsRequest(
        page_size=100, all_projects=True), metadata=cloud.admin)
    mine = [p for p in ports.ports if p.device_id == server.meta.id]
    assert mine and all(p.node == target for p in mine)

    await cloud.stub().ConfirmResize(V.ConfirmResizeRequest(id=server.meta.id),
                                     metadata=cloud.admin)
    done, _ = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    assert await exact(cloud, server.meta.id) == {target: OLD}
    assert server.meta.id not in [d.instance_id for d in await cloud.domains(source)]
    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    assert (await cloud.wait_clean([server.meta.id])).empty()


async def test_migration_refusals(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub = cloud.stub()
    with pytest.raises(grpc.aio.AioRpcError) as live:
        await stub.LiveMigrateInstance(V.LiveMigrateInstanceRequest(id=server.meta.id),
                                       metadata=cloud.admin)
    assert live.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(live.value) == "nubis.instance.live_migration_unsupported"
    assert "test" in (live.value.details() or "").lower()
    with pytest.raises(grpc.aio.AioRpcError) as same:
        await stub.MigrateInstance(V.MigrateInstanceRequest(
            id=server.meta.id, target_node=server.node), metadata=cloud.admin)
    assert same.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as alive:
        await stub.EvacuateInstance(V.EvacuateInstanceRequest(id=server.meta.id),
                                    metadata=cloud.admin)
    assert alive.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(alive.value) == "nubis.instance.source_node_up"
    unchanged = await cloud.get(server.meta.id)
    assert unchanged is not None and unchanged.state == Instance.ACTIVE and not unchanged.task_id
    assert not unchanged.HasField("migration")
    assert await exact(cloud, server.meta.id) == {server.node: OLD}


async def _node_down(cloud: ComputeCloud, name: str, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while True:
            node = await cloud.scheduler_stub().GetNode(scheduler_pb2.GetNodeRequest(name=name),
                                                        metadata=cloud.admin)
            if node.state == scheduler_pb2.NODE_STATE_DOWN:
                return
            await asyncio.sleep(0.3)


async def test_evacuate_rebuilds_the_server_of_a_down_node(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    source = server.node
    target = next(node for node in NODES if node != source)
    cloud.base.agents.started[NODES.index(source)].stop()  # the agent this test started
    await _node_down(cloud, source)

    started = await cloud.stub().EvacuateInstance(
        V.EvacuateInstanceRequest(id=server.meta.id), metadata=cloud.admin)
    assert started.task_state == Instance.TASK_STATE_REBUILDING
    done, seen = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    for _, held in seen:
        assert held in ({source: OLD}, {source: OLD, target: OLD}, {target: OLD}), held
    assert done.node == target and done.root_volume_id != server.root_volume_id
    assert await exact(cloud, server.meta.id) == {target: OLD}
    assert (await node_usage(cloud))[source] == (0, 0, 0)
    assert await cloud.domain_state(target, server.meta.id) == "running"
    old = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(
        id=server.root_volume_id), metadata=cloud.admin)
    assert old.state == volume_pb2.Volume.DELETING and not old.attachments  # queued to its node
