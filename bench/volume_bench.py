"""Volume benchmark: volumes created per second on 2 agents (libvirt test driver).

Starts its own etcd and Redis, identity and a scheduler in this process,
nubis-storage and two `nubis-agent` processes, then creates `--volumes` blank 1 GiB
volumes with `--in-flight` CreateVolume calls at a time (each placed by the
scheduler's node reports, recorded with its operation and quota in one etcd
transaction, made by an agent through `storage.ensure_volume` and recorded
AVAILABLE), and reports two rates: CreateVolume calls answered per second (the
API's share) and volumes AVAILABLE per second end to end. Then it deletes them
and reports deletions per second. Usage:
``python bench/volume_bench.py [--volumes N] [--in-flight K] [--projects P]``.
Every create and delete writes its project's quota usage in its transaction,
so one project's rate is bounded by etcd's commit latency; `--projects`
spreads the load over several.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.storage.v1 import volume_pb2

from services.common.logging import configure_logging
from services.common.settings import Settings

# The cloud is the one the volume tests run on (tests/functional/storage).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import EtcdEndpoint, RedisEndpoint, etcd_and_redis
from tests.functional.storage import volume_harness

Volume = volume_pb2.Volume
TARGET_RATE = 20.0
"""Volumes AVAILABLE per second end to end on 2 agents."""
WAIT = 180.0
"""Seconds the bench waits for every volume to settle before it reports what is stuck."""


async def _until_all(stub: Any, cloud: volume_harness.VolumeCloud, ids: set[str],
                     done: set[int] | None) -> None:
    """Poll the listing until every id is in `done` (None: until every id is gone)."""
    states: dict[str, int] = {}
    faults: dict[str, str] = {}
    try:
        async with asyncio.timeout(WAIT):
            await _poll(stub, cloud, ids, done, states, faults)
    except TimeoutError:
        counts: dict[str, int] = {}
        for state in states.values():
            name = Volume.State.Name(state)  # type: ignore[arg-type]
            counts[name] = counts.get(name, 0) + 1
        print(f"gave up after {WAIT:g}s; volumes by state: {counts}; faults: "
              f"{sorted(set(faults.values()))}", file=sys.stderr)
        raise


async def _poll(stub: Any, cloud: volume_harness.VolumeCloud, ids: set[str],
                done: set[int] | None, states: dict[str, int], faults: dict[str, str]) -> None:
    while True:
        listed = await stub.ListVolumes(volume_pb2.ListVolumesRequest(
            page_size=1000, all_projects=True), metadata=cloud.admin)
        states.clear()
        states.update({volume.meta.id: volume.state for volume in listed.volumes
                       if volume.meta.id in ids})
        faults.update({volume.meta.id: f"{volume.fault.reason}: {volume.fault.message}"
                       for volume in listed.volumes if volume.fault.reason})
        if done is None and not states:
            return
        if done is not None and len(states) == len(ids) and set(states.values()) <= done:
            errors = [i for i, state in states.items() if state == Volume.ERROR]
            if errors:
                raise RuntimeError(f"{len(errors)} volumes went to ERROR")
            return
        await asyncio.sleep(0.05)


async def run(etcd: EtcdEndpoint, redis: RedisEndpoint, workdir: Path,
              args: argparse.Namespace) -> dict[str, float]:
    # Storage runs as a process of its own, as in a deployment; identity, the
    # scheduler and this client share the bench's process.
    cloud = await volume_harness.build(etcd, redis, workdir, in_process_storage=False)
    try:
        cloud.start_storage_process(NUBIS_LOG_LEVEL="warning")
        callers = [(cloud.admin_project, cloud.admin)]
        if args.projects > 1:
            callers = [await cloud.member_of_new_project(f"bench{i}")
                       for i in range(args.projects)]
        for project_id, _ in callers:
            await cloud.identity_stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
                quota=identity_pb2.Quota(project_id=project_id,
                                         limits={"volumes": -1, "volume_gb": -1}),
                update_mask=field_mask_pb2.FieldMask(paths=["limits"])), metadata=cloud.admin)
        stub = cloud.stub()
        gate = asyncio.Semaphore(args.in_flight)

        async def create(index: int) -> str:
            async with gate:
                made = await stub.CreateVolume(volume_pb2.CreateVolumeRequest(volume=Volume(
                    meta=resource_pb2.ResourceMeta(name=f"bench-{index}"), size_gb=1)),
                    metadata=callers[index % len(callers)][1])
                return str(made.meta.id)

        started = time.perf_counter()
        ids = set(await asyncio.gather(*(create(i) for i in range(args.volumes))))
        answered = time.perf_counter() - started
        await _until_all(stub, cloud, ids, {Volume.AVAILABLE, Volume.ERROR})
        available = time.perf_counter() - started

        async def delete(volume_id: str) -> None:
            async with gate:
                await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=volume_id),
                                        metadata=cloud.admin)

        started = time.perf_counter()
        await asyncio.gather(*(delete(i) for i in ids))
        await _until_all(stub, cloud, ids, None)
        deleted = time.perf_counter() - started
    finally:
        await cloud.close()
    return {"volumes": args.volumes, "in_flight": args.in_flight, "projects": args.projects,
            "create_calls_per_s": round(args.volumes / answered, 1),
            "available_per_s": round(args.volumes / available, 1),
            "deleted_per_s": round(args.volumes / deleted, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--projects", type=int, default=1,
                        help="spread the creates over this many projects (each its own quota)")
    args = parser.parse_args()
    configure_logging(Settings(log_level="warning", log_json=False))
    with tempfile.TemporaryDirectory(prefix="nubis-volume-bench-") as tmp:
        workdir = Path(tmp)
        with etcd_and_redis(workdir) as (etcd, redis):
            met = asyncio.run(run(etcd, redis, workdir, args))
    met["target_available_per_s"] = TARGET_RATE
    print(json.dumps(met, indent=2))
    sys.exit(0 if met["available_per_s"] >= TARGET_RATE else 1)


if __name__ == "__main__":
    main()
