"""Booting servers end to end on the libvirt test driver, and deleting them without a trace."""

from __future__ import annotations

import asyncio

from tests.functional.compute.harness import NODES, ComputeCloud, Instance, bare_cloud, cloud

__all__ = ["bare_cloud", "cloud"]


async def test_one_server_boots_and_deletes(cloud: ComputeCloud) -> None:
    made = await cloud.create()
    assert made.state == Instance.BUILDING
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    assert found.power_state == Instance.POWER_STATE_RUNNING
    assert found.node and found.root_volume_id and found.addresses
    assert await cloud.domain_state(found.node, found.meta.id) == "running"
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

