"""A compute process killed (SIGKILL) in the middle of resizes, started again: every resize
ends in VERIFY_RESIZE (or back where it began), each node counts exactly the claims the
instances hold, and confirming then deleting them leaves nothing behind."""

from __future__ import annotations

import asyncio

from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.compute.v1 import operation_pb2

from services.compute import keys
from tests.functional.compute.harness import NODES, ComputeCloud, Instance, bare_cloud
from tests.functional.compute.test_resize import NEW, OLD, allocations, make_flavor, node_usage

__all__ = ["bare_cloud"]


async def test_killed_compute_restarted_finishes_every_resize(bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    stub = cloud.stub()
    made = await asyncio.gather(*(cloud.create(stub=stub) for _ in range(4)))
    ids = [m.meta.id for m in made]
    booted = await asyncio.gather(*(cloud.wait_final(i, 90) for i in ids))
    assert all(b.state == Instance.ACTIVE for b in booted), [b.fault.message for b in booted]
    bigger = await make_flavor(cloud, *NEW)
    await asyncio.gather(*(stub.ResizeInstance(V.ResizeInstanceRequest(
        id=i, flavor_id=bigger), metadata=cloud.admin) for i in ids))
    # Killed once every destination disk is recorded (a CreateRootDisk cut off by its
    # caller's death is storage's to recover, not what this test is about).
    async with asyncio.timeout(30):
        while True:
            now = [await cloud.get(i) for i in ids]
            if all(f is not None and (f.migration.destination_root_volume_id or not f.task_id)
                   for f in now):
                break
            await asyncio.sleep(0.01)
    in_flight, _ = await cloud.base.store.list_all(keys.OPERATIONS, operation_pb2.Operation)
    cloud.kill(first)
    assert in_flight, "every resize finished before the kill: nothing was tested"

    cloud.start_compute_process()  # the same address; it adopts what the dead one ran
    done = []
    for instance_id in ids:
        for _ in range(300):
            found = await cloud.get(instance_id)
            assert found is not None
            if not found.task_id:
                done.append(found)
                break
            await asyncio.sleep(0.2)
        else:
            ops, _ = await cloud.base.store.list_all(keys.OPERATIONS, operation_pb2.Operation)
            raise AssertionError(f"still in flight: {found}\n{[o.value for o in ops]}")
    assert all(d.state == Instance.VERIFY_RESIZE for d in done), [
        (Instance.State.Name(d.state), d.fault.message) for d in done]
    counted = {name: [0, 0, 0] for name in NODES}
    for server, before in zip(done, booted, strict=True):
        held = await allocations(cloud, server.meta.id)
        assert held == {before.node: OLD, server.node: NEW}, held
        for node, sizes in held.items():
            counted[node] = [a + b for a, b in zip(counted[node], sizes, strict=True)]
        assert await cloud.domain_state(server.node, server.meta.id) == "running"
    assert await node_usage(cloud) == {name: tuple(sizes) for name, sizes in counted.items()}

    await asyncio.gather(*(cloud.stub().ConfirmResize(V.ConfirmResizeRequest(id=i),
                                                      metadata=cloud.admin) for i in ids))
    confirmed = await asyncio.gather(*(cloud.wait_final(i, 60) for i in ids))
    assert all(c.state == Instance.ACTIVE for c in confirmed)
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left
