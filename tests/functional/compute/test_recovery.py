"""A compute process killed (SIGKILL) in the middle of boots: every server still ends ACTIVE or
ERROR, none stays BUILDING, and deleting them leaves nothing behind."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import operation_pb2

from services.client.lab import daemons
from services.compute import keys
from tests.functional.compute.harness import FINAL, ComputeCloud, Instance, bare_cloud

__all__ = ["bare_cloud"]


_PAST_SCHEDULING = frozenset({Instance.TASK_STATE_NETWORKING,
                              Instance.TASK_STATE_BLOCK_DEVICE_MAPPING,
                              Instance.TASK_STATE_SPAWNING})


async def until_mid_build(cloud: ComputeCloud, ids: list[str]) -> None:
    """Return once one of the builds `ids` is past scheduling (wiring, mapping or spawning),
    read from the store every 10 ms: on a quiet machine a build takes well under a second."""
    wanted = set(ids)
    async with asyncio.timeout(30):
        while True:
            records, _ = await cloud.base.store.list_all(keys.INSTANCES, Instance)
            if any(r.value.meta.id in wanted and r.value.task_state in _PAST_SCHEDULING
                   for r in records):
                return
            await asyncio.sleep(0.01)


async def _boot(cloud: ComputeCloud, count: int) -> list[str]:
    stub = cloud.stub()
    made = await asyncio.gather(*(cloud.create(stub=stub) for _ in range(count)))
    ids = [m.meta.id for m in made]
    await until_mid_build(cloud, ids)
    return ids


async def _kill_in_flight(cloud: ComputeCloud, proc: daemons.Daemon) -> None:
    """SIGKILL `proc` while it still runs operations (their records say so)."""
    in_flight, _ = await cloud.base.store.list_all(keys.OPERATIONS, operation_pb2.Operation)
    cloud.kill(proc)
    assert in_flight, "every operation finished before the kill: nothing was tested"


async def _all_final_then_clean(cloud: ComputeCloud, ids: list[str]) -> None:
    found = await asyncio.gather(*(cloud.wait_final(i, 90) for i in ids))
    assert all(f.state in FINAL for f in found)
    for server in found:
        if server.node:  # an ACTIVE server's domain runs on its node, asked of the agent
            assert await cloud.domain_state(server.node, server.meta.id) == "running"
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left


async def test_killed_compute_restarted_finishes_every_boot(bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    ids = await _boot(cloud, 10)
    await _kill_in_flight(cloud, first)
    cloud.start_compute_process()  # the same address; it adopts what the dead one ran
    await _all_final_then_clean(cloud, ids)


async def test_one_of_two_replicas_killed_the_other_finishes(bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    doomed = cloud.start_compute_process()
    survivor_port = daemons.free_port()
    cloud.start_compute_process(port=survivor_port)
    ids = await _boot(cloud, 10)
    await _kill_in_flight(cloud, doomed)
    cloud.compute_port = survivor_port  # from now on every call goes to the survivor
    await _all_final_then_clean(cloud, ids)


async def test_killed_compute_restarted_finishes_every_delete(bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    ids = await _boot(cloud, 6)
    await asyncio.gather(*(cloud.wait_final(i, 90) for i in ids))
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await _kill_in_flight(cloud, first)  # teardowns in flight now
    cloud.start_compute_process()
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left
