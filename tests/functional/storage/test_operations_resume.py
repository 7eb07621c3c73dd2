"""A storage replica killed mid-operation: its operations are adopted and finished, none stuck."""

from __future__ import annotations

import asyncio
import os
import signal

from nubis.storage.v1 import operation_pb2, volume_pb2

from services.common.settings import ServiceEndpoint
from services.storage import keys
from services.storage import main as storage_main
from tests.functional.authz.world import start_service
from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import VolumeCloud, wait_for

Volume = volume_pb2.Volume


async def _states(cloud: VolumeCloud) -> dict[str, int]:
    items, _ = await cloud.store.list_all(keys.VOLUMES, Volume)
    return {item.value.meta.id: item.value.state for item in items}


async def test_a_killed_replica_leaves_no_volume_creating_after_restart(
    bare_cloud: VolumeCloud,
) -> None:
    cloud = bare_cloud
    cloud.start_storage_process(NUBIS_STORAGE__OPERATION_LEASE_TTL="3",
                                NUBIS_STORAGE__OPERATION_SCAN_INTERVAL="0.5")
    stub = cloud.stub()
    # Agents frozen (SIGSTOP): the tasks wait in their queues, so every create
    # is still in flight when the replica dies.
    agents = [daemon.proc.pid for daemon in cloud.agents.started]
    for pid in agents:
        os.kill(pid, signal.SIGSTOP)
    try:
        made = await asyncio.gather(*(stub.CreateVolume(new_volume(f"r{i}", 1),
                                                        metadata=cloud.admin)
                                      for i in range(6)))
        cloud.kill_storage_process()
    finally:
        for pid in agents:
            os.kill(pid, signal.SIGCONT)
    before = await _states(cloud)
    assert set(before.values()) == {Volume.CREATING}
    assert len(before) == len(made)
    dead_owners = {item.value.lease_id for item in
                   (await cloud.store.list_all(keys.OPERATIONS, operation_pb2.Operation))[0]}
    assert len(dead_owners) == 1

    cloud.start_storage_process(NUBIS_STORAGE__OPERATION_LEASE_TTL="3",
                                NUBIS_STORAGE__OPERATION_SCAN_INTERVAL="0.5")

    async def settled() -> bool:
        return Volume.CREATING not in (await _states(cloud)).values()

    await wait_for(settled, 60)
    after = await _states(cloud)
    assert set(after) == set(before)
    assert set(after.values()) <= {Volume.AVAILABLE, Volume.ERROR}
    assert set(after.values()) == {Volume.AVAILABLE}
    ops, _ = await cloud.store.list_all(keys.OPERATIONS, operation_pb2.Operation)
    assert not ops
    for item in (await cloud.store.list_all(keys.VOLUMES, Volume))[0]:
        volume = item.value
        seen = await cloud.ask_agent(volume.node, volume.libvirt_name, volume.pool_name)
        assert seen.found, (volume.node, volume.pool_name, volume.libvirt_name)


async def test_another_replica_adopts_the_operations_of_a_killed_one(
    bare_cloud: VolumeCloud,
) -> None:
    cloud = bare_cloud
    cloud.start_storage_process(NUBIS_STORAGE__OPERATION_LEASE_TTL="3",
                                NUBIS_STORAGE__OPERATION_SCAN_INTERVAL="0.5")
    survivor = await start_service(storage_main.build, cloud.store, cloud.settings,
                                   ServiceEndpoint(host="127.0.0.1", port=0))
    try:
        stub = cloud.stub()
        agents = [daemon.proc.pid for daemon in cloud.agents.started]
        for pid in agents:
            os.kill(pid, signal.SIGSTOP)
        try:
            made = await asyncio.gather(*(stub.CreateVolume(new_volume(f"o{i}", 1),
                                                            metadata=cloud.admin)
                                          for i in range(4)))
            cloud.kill_storage_process()
        finally:
            for pid in agents:
                os.kill(pid, signal.SIGCONT)
        assert set((await _states(cloud)).values()) == {Volume.CREATING}

        async def settled() -> bool:
            return set((await _states(cloud)).values()) == {Volume.AVAILABLE}

        await wait_for(settled, 60)
        assert len(await _states(cloud)) == len(made)
        assert not (await cloud.store.list_all(keys.OPERATIONS, operation_pb2.Operation))[0]
    finally:
        await survivor.stop()


async def test_a_replica_stopped_cleanly_hands_its_operations_over_at_once(
    bare_cloud: VolumeCloud,
) -> None:
    cloud = bare_cloud
    slow = cloud.settings.model_copy(deep=True)
    slow.storage.operation_lease_ttl = 60  # adoption by expiry would take a minute
    leaving = await start_service(storage_main.build, cloud.store, slow,
                                  ServiceEndpoint(host="127.0.0.1", port=0))
    staying = await start_service(storage_main.build, cloud.store, cloud.settings,
                                  ServiceEndpoint(host="127.0.0.1", port=0))
    try:
        stub = cloud.stub(leaving.running.address)
        agents = [daemon.proc.pid for daemon in cloud.agents.started]
        for pid in agents:
            os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.gather(*(stub.CreateVolume(new_volume(f"h{i}", 1),
                                                     metadata=cloud.admin) for i in range(3)))
            await leaving.stop()
        finally:
            for pid in agents:
                os.kill(pid, signal.SIGCONT)

        async def settled() -> bool:
            return set((await _states(cloud)).values()) == {Volume.AVAILABLE}

        await wait_for(settled, 30)
    finally:
        await staying.stop()
