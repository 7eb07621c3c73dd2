"""`nubis node|server-group|allocation` against a real scheduler replica."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

from nubis.scheduler.v1 import scheduler_pb2

from services.common.store import Store
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness


async def nubis(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """Run the real `nubis` command line in its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.client.cli", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_node_group_and_allocation_commands(
    etcd: EtcdEndpoint, key_prefix: str, store: Store, tmp_path: Path,
) -> None:
    await harness.put_node(store, harness.report("n1"))
    replica = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    env = dict(os.environ, NUBIS_SCHEDULER_ADDR=replica.running.address,
               NUBIS_LAB_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), COLUMNS="200")
    try:
        await harness.wait_for(lambda: _has_node(replica))
        code, out, _ = await nubis(env, "-o", "json", "node", "list")
        assert code == 0
        [row] = json.loads(out)
        assert row["name"] == "n1" and row["state"] == "UP" and row["vcpus"] == "0/128"

        code, out, _ = await nubis(env, "node", "disable", "n1", "--reason", "maintenance")
        assert code == 0 and "maintenance" in out
        code, out, _ = await nubis(env, "-o", "json", "node", "set", "n1", "--cpu-ratio", "2",
                                   "--reserved-vcpus", "2", "--trait", "CUSTOM_FAST")
        assert code == 0 and json.loads(out)["vcpus"] == "0/12"
        code, out, _ = await nubis(env, "-o", "json", "node", "show", "n1")
        shown = json.loads(out)
        assert shown["disabled"] is True and "CUSTOM_FAST" in shown["traits"]
        code, _, _ = await nubis(env, "node", "enable", "n1")
        assert code == 0

        code, out, _ = await nubis(env, "-o", "json", "node", "list", "--filter", "state=DOWN")
        assert code == 0 and json.loads(out) == []
        code, _, err = await nubis(env, "node", "list", "--filter", "colour=red")
        assert code == 1 and "colour" in err

        code, out, err = await nubis(env, "-o", "json", "server-group", "create", "web",
                                     "--policy", "anti-affinity", "--request-id", "cli-1")
        assert code == 0, err
        group = json.loads(out)
        assert code == 0 and group["policy"] == "anti-affinity"
        code, out, _ = await nubis(env, "-o", "json", "server-group", "create", "web",
                                   "--policy", "anti-affinity", "--request-id", "cli-1")
        assert code == 0 and json.loads(out)["id"] == group["id"]
        code, out, _ = await nubis(env, "-o", "json", "server-group", "list",
                                   "--filter", "policy=AFFINITY")
        assert code == 0 and json.loads(out) == []
        consumer = str(uuid.uuid4())
        await replica.stub.SelectDestinations(scheduler_pb2.SelectDestinationsRequest(
            spec=scheduler_pb2.RequestSpec(
                resources=scheduler_pb2.Resources(vcpus=1, memory_mb=64),
                consumer_ids=[consumer], server_group_id=group["id"])))
        code, out, _ = await nubis(env, "-o", "json", "server-group", "show", group["id"])
        assert json.loads(out)["members"] == [f"{consumer}@n1"]
        code, out, _ = await nubis(env, "-o", "json", "allocation", "show", consumer)
        assert json.loads(out)["allocations"][0]["node_name"] == "n1"

        code, _, err = await nubis(env, "node", "show", "ghost")
        assert code == 1 and "not found" in err.lower()
        code, _, err = await nubis(env, "node", "set", "n1", "--cpu-ratio", "-1")
        assert code == 1 and "allocation_ratios.cpu" in err
    finally:
        await replica.stop()


async def _has_node(replica: harness.Replica) -> bool:
    view = replica.cache.view("n1")
    return view is not None and view.up and view.settings is not None


async def test_default_ratio_commands_and_reserved_past_capacity(
    etcd: EtcdEndpoint, key_prefix: str, store: Store, tmp_path: Path,
) -> None:
    await harness.put_node(store, harness.report("n1", vcpus=16))
    replica = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    env = dict(os.environ, NUBIS_SCHEDULER_ADDR=replica.running.address,
               NUBIS_LAB_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), COLUMNS="200")
    try:
        await harness.wait_for(lambda: _has_node(replica))
        code, out, err = await nubis(env, "-o", "json", "node", "defaults")
        assert code == 0, err
        shown = json.loads(out)
        assert (shown["cpu_ratio"], shown["ram_ratio"], shown["disk_ratio"]) == (16.0, 1.5, 1.0)
        code, out, err = await nubis(env, "-o", "json", "node", "set-defaults",
                                     "--cpu-ratio", "4")
        assert code == 0, err
        changed = json.loads(out)
        assert changed["cpu_ratio"] == 4.0 and changed["revision"] > shown["revision"]
        code, out, _ = await nubis(env, "-o", "json", "node", "show", "n1")
        assert int(json.loads(out)["free"]["vcpus"]) == 16 * 4
        code, _, err = await nubis(env, "node", "set-defaults", "--ram-ratio", "0")
        assert code == 1 and "ratios.ram" in err

        # 9999 reserved vCPUs on a 16-vCPU node: refused, naming the field.
        code, _, err = await nubis(env, "node", "set", "n1", "--reserved-vcpus", "9999")
        assert code == 1 and "reserved.vcpus" in err and "capacity" in err
        code, out, _ = await nubis(env, "-o", "json", "node", "list")
        assert json.loads(out)[0]["vcpus"] == "0/64"
    finally:
        await replica.stop()
