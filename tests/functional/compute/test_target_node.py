"""`scheduler_hints.target_node` on create: an operator's forced node (Nova's zone:host) is
where the server lands, each node in turn; a non-admin naming it is refused, as is a node
that does not exist, naming the field, before anything is claimed."""

from __future__ import annotations

import grpc
import pytest
from nubis.compute.v1 import instance_pb2, instance_requests_pb2

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, cloud
from tests.functional.compute.test_resize import OLD, exact

__all__ = ["cloud"]

FIELD = "instance.scheduler_hints.target_node"


def _pinned(cloud: ComputeCloud, node: str) -> Instance:
    made = cloud.server()
    made.scheduler_hints.CopyFrom(instance_pb2.SchedulerHints(target_node=node))
    return made


async def test_an_admin_forces_each_node_in_turn(cloud: ComputeCloud) -> None:
    for node in (NODES[1], NODES[0], NODES[1]):  # not the scheduler's choice by chance
        made = await cloud.create(_pinned(cloud, node))
        found = await cloud.wait_final(made.meta.id)
        assert found.state == Instance.ACTIVE, found.fault.message
        assert found.node == node
        assert await exact(cloud, made.meta.id) == {node: OLD}
        assert await cloud.domain_state(node, made.meta.id) == "running"
        await cloud.delete(made.meta.id)
        await cloud.wait_gone(made.meta.id)


async def test_a_member_or_an_unknown_node_is_refused(cloud: ComputeCloud) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await cloud.create(_pinned(cloud, "no-such-node"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert FIELD in (unknown.value.details() or "")

    project, member = await cloud.base.member_of_new_project("pin")
    request = instance_requests_pb2.CreateInstanceRequest(instance=_pinned(cloud, NODES[0]))
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await cloud.stub().CreateInstance(request, metadata=member)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert FIELD in (denied.value.details() or "")
    listed = await cloud.stub().ListInstances(instance_requests_pb2.ListInstancesRequest(
        page_size=100, all_projects=True), metadata=cloud.admin)
    assert not listed.instances  # nothing was made
    assert project
