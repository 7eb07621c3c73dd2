"""The storage tasks' phases in one process, on the embedded libvirt test driver.

Deliveries of one task racing each other (a redelivery while the first still
runs) take the volume's lock in turn and the later ones find the work done in
their prerequisites: one volume, one `changed`.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import phases
from services.agent.tasks import storage as storage_tasks
from services.common import tasks
from services.common.settings import AgentSettings, Settings

GIB = 1 << 30


@pytest.fixture
def driver() -> Iterator[driver_module.Driver]:
    """A driver whose node pool is a fresh pool of the in-process test hypervisor."""
    pool = f"phases-{uuid.uuid4().hex[:6]}"
    made = driver_module.Driver("test:///default", storage_pool=pool, storage_pool_path=f"/{pool}")
    made.storage.ensure_node_pool()
    yield made
    handle = made.connection.get().storagePoolLookupByName(pool)
    for volume in handle.listAllVolumes(0):
        volume.delete(0)
    handle.destroy()
    handle.undefine()
    made.close()


def _task(driver: driver_module.Driver, kind: type[Any], cache: Path) -> Any:
    settings = Settings(agent=AgentSettings(image_cache_path=str(cache)))
    return next(t for t in storage_tasks.all_tasks(driver, settings, "n1") if isinstance(t, kind))


def _ctx() -> phases.Context:
    return phases.Context(node="n1", operation_id=tasks.OperationId("op"), task_id="t",
                          deadline=time.time() + 30)


def test_deliveries_racing_each_other_make_one_volume(driver: driver_module.Driver,
                                                      tmp_path: Path) -> None:
    ensure = _task(driver, storage_tasks.EnsureVolume, tmp_path)
    payload = tasks.to_json(tasks_pb2.EnsureVolumeRequest(name="volume-race", capacity_bytes=GIB))
    locks = phases.Locks()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: phases.run(ensure, _ctx(), payload, locks), range(4)))
    replies = [tasks.outcome_response(tasks.ENSURE_VOLUME, outcome, "n1") for outcome in outcomes]
    assert sorted(reply.changed for reply in replies) == [False, False, False, True]
    assert [v.name for v in driver.volumes.all(driver.storage.node_pool_name())] == [
        "volume-race"]

