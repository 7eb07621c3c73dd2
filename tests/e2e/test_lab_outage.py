"""A lab rides out an etcd outage longer than every lease TTL, and needs no restart.

The lab's own etcd (never the test session's) is stopped for twice the
longest TTL; `nubis lab up` then restarts just etcd, and every service comes
back to SERVING by itself, the catalog is complete again, both nodes are UP
and a claim succeeds, with every other process the same as before.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import make_channel
from services.client.lab import components, daemons, health, state
from tests.e2e.lab_cli import recorded_pids, run_cli, status_rows

TTL = 3  # every lease of the lab: agents' node keys and the catalog entries
SHORT_TTLS = {
    "NUBIS_AGENT__LEASE_TTL": str(TTL),
    "NUBIS_CATALOG_TTL": str(TTL),
    "NUBIS_ETCD__TIMEOUT": "2",
    "NUBIS_ETCD__HEALTH_INTERVAL": "0.5",
}
SERVICES = [name for name in components.CONTROL_SERVICES if components.service_exists(name)]


def services_health(lab_dir: Path) -> dict[str, str]:
    lab = state.load(lab_dir)
    assert lab is not None

    async def probe() -> dict[str, str]:
        records = [p for p in lab.processes if p.name.startswith("nubis-") and p.port]
        verdicts = await asyncio.gather(
            *(health.grpc_health(f"{lab.host}:{p.port}") for p in records))
        return {p.name: verdict for p, verdict in zip(records, verdicts, strict=True)}

    return asyncio.run(probe())


def cli_json(lab_dir: Path, *args: str) -> list[dict[str, object]]:
    done = run_cli("-o", "json", *args, env={"NUBIS_LAB_DIR": str(lab_dir)})
    if done.returncode != 0:
        return []
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def whole(lab_dir: Path) -> bool:
    """Every service SERVING, one catalog entry per service, both nodes UP."""
    if set(services_health(lab_dir).values()) != {health.SERVING}:
        return False
    catalog = sorted(str(row["name"]) for row in cli_json(lab_dir, "catalog", "list"))
    nodes = {str(row["name"]): row["state"] for row in cli_json(lab_dir, "node", "list")}
    return catalog == sorted(SERVICES) and nodes == {"node-1": "UP", "node-2": "UP"}


def eventually(predicate: Callable[[], object], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"{what} not within {within:.0f} s")


def claim(lab_dir: Path) -> str:
    lab = state.load(lab_dir)
    assert lab is not None
    token = json.loads((lab_dir / "credentials.json").read_text())["token"]
    address = lab.endpoints()["nubis-scheduler"]

    async def select() -> str:
        async with make_channel(address, token=token) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            reply = await stub.SelectDestinations(scheduler_pb2.SelectDestinationsRequest(
                spec=scheduler_pb2.RequestSpec(
                    resources=scheduler_pb2.Resources(vcpus=1, memory_mb=128, disk_gb=1),
                    consumer_ids=[str(uuid.uuid4())])), timeout=10)
            return str(reply.destinations[0].node_name)

    return asyncio.run(select())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_lab_rides_out_an_etcd_outage_longer_than_every_ttl(
    lab_dir: Path, base_port: int,
) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                 env=SHORT_TTLS)
    assert up.returncode == 0, up.stdout + up.stderr
    eventually(lambda: whole(lab_dir), 30, "a whole lab")
    pids = recorded_pids(lab_dir)

    daemons.stop_pid(pids["etcd"])
    stopped = time.monotonic()
    eventually(lambda: set(services_health(lab_dir).values()) == {health.NOT_SERVING}, 20,
               "every service NOT_SERVING while etcd is down")
    time.sleep(max(0.0, stopped + 2 * TTL - time.monotonic()))

    again = run_cli("lab", "up", "--state-dir", str(lab_dir), env=SHORT_TTLS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Restarted: etcd " in again.stdout
    eventually(lambda: whole(lab_dir), 40, "the whole lab again after the outage")
    assert claim(lab_dir) in ("node-1", "node-2")
    after = recorded_pids(lab_dir)
    assert {k: v for k, v in after.items() if k != "etcd"} == {
        k: v for k, v in pids.items() if k != "etcd"}, "a process other than etcd restarted"
    for row in status_rows(lab_dir):
        assert row["alive"] is True, row
