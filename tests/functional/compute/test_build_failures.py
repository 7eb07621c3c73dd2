"""Boots that fail at the agent: rescheduled onto a node that works, else ERROR, nothing leaked."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import instance_action_pb2

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, cloud

__all__ = ["cloud"]
# The test driver offers no kvm domains: an agent configured for kvm refuses every spawn.
REFUSES = {"NUBIS_AGENT__VIRT_TYPE": "kvm"}


async def _events(cloud: ComputeCloud, instance_id: str) -> list[str]:
    reply = await cloud.stub().ListInstanceActions(
        instance_action_pb2.ListInstanceActionsRequest(instance_id=instance_id),
        metadata=cloud.admin)
    return [event.name for action in reply.actions for event in action.events]


async def test_a_boot_every_node_refuses_ends_error_and_leaks_nothing(
        cloud: ComputeCloud) -> None:
    for node in NODES:
        await cloud.restart_agent(node, **REFUSES)
    made = await cloud.create()
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ERROR
    assert "build failed at spawn on node" in found.fault.message, found.fault.message
    assert "kvm" in found.fault.message  # why: what the node's libvirt refused
    assert found.fault.reason == "nubis.agent.virt_type_unavailable"
    assert "no other node to reschedule to" in found.fault.message
    assert not found.node and not found.port_ids and not found.root_volume_id
    # Each refusing node is left for another; the last reschedule finds none.
    assert (await _events(cloud, found.meta.id)).count("reschedule") == len(NODES)
    left = await cloud.wait_clean([found.meta.id])
    assert left.empty(), left
    await cloud.delete(found.meta.id)
    await cloud.wait_gone(found.meta.id)
    left = await cloud.wait_clean([found.meta.id])
    assert left.empty(), left


async def test_a_boot_on_a_refusing_node_is_rescheduled_onto_the_other(
        cloud: ComputeCloud) -> None:
    bad, good = NODES
    await cloud.restart_agent(bad, **REFUSES)
    made = await asyncio.gather(*(cloud.create() for _ in range(6)))
    found = await asyncio.gather(*(cloud.wait_final(m.meta.id, 90) for m in made))
    assert [f.state for f in found] == [Instance.ACTIVE] * 6, [f.fault.message for f in found]
    assert {f.node for f in found} == {good}
    rescheduled = [f for f in found if "reschedule" in await _events(cloud, f.meta.id)]
    assert rescheduled  # the spread weigher sends some to the refusing node first
    for server in rescheduled:
        assert await cloud.domain_state(good, server.meta.id) == "running"
    assert not [d for d in await cloud.domains(bad) if d.name.startswith("instance-")]
    ids = [f.meta.id for f in found]
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left
