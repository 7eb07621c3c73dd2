"""`nubis flavor|keypair|server ...` run as the CLI against real compute (and, for servers,
real identity, scheduler, network, storage and two test-driver agents)."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from nubis.storage.v1 import volume_pb2

from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.cli_runner import Nubis
from tests.functional.compute import harness
from tests.functional.compute.harness import ComputeCloud
from tests.functional.compute.test_hotplug import volume_on, volume_state
from tests.functional.storage import volume_harness


def _token(metadata: tuple[tuple[str, str], ...]) -> str:
    return dict(metadata)["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
async def shared_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ComputeCloud]:
    """One cloud for the module: each test makes and removes its own resources."""
    made = await harness.build(etcd, redis, tmp_path_factory.mktemp("compute-cli"))
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def nubis(shared_cloud: ComputeCloud, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Nubis:
    """The CLI as the cloud admin."""
    base = shared_cloud.base
    return Nubis.configure(monkeypatch, capsys, tmp_path / "cli", _token(shared_cloud.admin),
                           identity=base.identity.running.address,
                           compute=shared_cloud.compute_address, storage=base.storage_address,
                           network=shared_cloud.network.running.address,
                           scheduler=base.scheduler.running.address)


async def test_flavor_create_list_show_set_delete(nubis: Nubis) -> None:
    name = f"c1.cli-{uuid.uuid4().hex[:4]}"
    made = await nubis.json("flavor", "create", name, "--vcpus", "2", "--ram", "1024",
                                 "--disk", "10", "--property", "trait:CUSTOM_FAST=required")
    assert (made["name"], made["vcpus"], made["ram_mb"], made["disk_gb"]) == (
        name, 2, 1024, 10)
    assert made["state"] == "ACTIVE" and made["is_public"] is True
    assert made["id"] in {f["id"] for f in await nubis.json("flavor", "list")}
    assert (await nubis.json("flavor", "show", name))["id"] == made["id"]  # by name
    disabled = await nubis.json("flavor", "set", name, "--disable", "--property",
                                     "hw:watchdog_action=reset")
    assert disabled["state"] == "DISABLED"
    assert disabled["extra_specs"]["hw:watchdog_action"] == "reset"
    assert "trait:CUSTOM_FAST" in disabled["extra_specs"]  # kept: set merges
    code, _, err = await nubis("flavor", "delete", name)
    assert code == 0, err
    error = await nubis.fails("flavor", "show", name)
    assert error == f"error: no flavor named {name!r} (nubis.cli.no_such_name)"


async def test_private_flavor_access_by_project_name(nubis: Nubis,
                                                     shared_cloud: ComputeCloud) -> None:
    name = f"p1.cli-{uuid.uuid4().hex[:4]}"
    made = await nubis.json("flavor", "create", name, "--vcpus", "1", "--ram", "128",
                                 "--private")
    assert made["is_public"] is False
    granted = await nubis.json("flavor", "access-add", name, "admin")  # by name
    assert granted["access_project_ids"] == [shared_cloud.project]
    revoked = await nubis.json("flavor", "access-remove", name, shared_cloud.project)
    assert revoked.get("access_project_ids", []) == []


async def test_keypair_generated_prints_its_private_key_once(nubis: Nubis,
                                                             tmp_path: Path) -> None:
    name = f"key-{uuid.uuid4().hex[:4]}"
    code, out, err = await nubis("keypair", "create", name)
    assert code == 0, err
    private = out[out.index("-----BEGIN OPENSSH PRIVATE KEY-----"):]
    serialization.load_ssh_private_key(private.encode(), password=None)  # a whole key
    shown = await nubis.json("keypair", "show", name)
    assert shown["public_key"].startswith("ssh-ed25519 ")
    code, out, _ = await nubis("-o", "json", "keypair", "show", name)
    assert "PRIVATE KEY" not in out  # never again
    listed = await nubis.json("keypair", "list")
    assert name in {k["name"] for k in listed}
    public = tmp_path / "id.pub"
    public.write_text(shown["public_key"] + "\n")
    imported = await nubis.json("keypair", "create", f"{name}-2", "--public-key-file",
                                     str(public))
    assert "private_key" not in imported and imported["fingerprint"] == shown["fingerprint"]
    for each in (name, f"{name}-2"):
        code, _, err = await nubis("keypair", "delete", each)
        assert code == 0, err
    assert name not in {k["name"] for k in await nubis.json("keypair", "list")}


async def test_server_create_wait_stop_start_delete(nubis: Nubis,
                                                    shared_cloud: ComputeCloud) -> None:
    cloud = shared_cloud
    net = cloud.network_id
    code, out, err = await nubis("-o", "json", "server", "create", "demo", "--flavor",
                                 cloud.flavor_id, "--image", cloud.image_id, "--network", net,
                                 "--wait", "--timeout", "60")
    assert code == 0, err
    server = json.loads(out)
    assert (server["name"], server["state"], server["task_state"]) == ("demo", "ACTIVE", "")
    assert server["power_state"] == "running" and server["addresses"]
    assert f"server demo ({server['id']}): ACTIVE after" in err  # the final line
    assert server["id"] in {s["id"] for s in await nubis.json("server", "list")}
    assert (await nubis.json("server", "show", "demo"))["id"] == server["id"]  # by name

    error = await nubis.fails("server", "start", "demo")
    assert error.startswith("error: FAILED_PRECONDITION: ") and "ACTIVE" in error
    assert error.endswith("(nubis.instance.bad_state)")
    stopped = await nubis.json("server", "stop", "demo", "--wait", "--timeout", "60")
    assert stopped["state"] == "STOPPED" and stopped["power_state"] != "running"
    started = await nubis.json("server", "start", "demo", "--wait", "--timeout", "60")
    assert (started["state"], started["power_state"]) == ("ACTIVE", "running")
    actions = await nubis.json("server", "action-list", "demo")
    assert [a["action"] for a in actions][:3] == ["start", "stop", "create"]
    assert {a["state"] for a in actions} == {"SUCCEEDED"}

    code, out, err = await nubis("server", "delete", "demo", "--wait", "--timeout", "60")
    assert code == 0, err
    assert f"server demo ({server['id']}): DELETED after" in out
    assert await cloud.get(server["id"]) is None
    left = await cloud.wait_clean([server["id"]])
    assert left.empty(), left


async def test_count_boots_named_servers_and_a_failed_boot_exits_with_its_fault(
        nubis: Nubis, shared_cloud: ComputeCloud) -> None:
    cloud = shared_cloud
    made = await nubis.json("server", "create", "web", "--count", "2", "--flavor",
                            cloud.flavor_id, "--image", cloud.image_id, "--network",
                            cloud.network_id, "--wait", "--timeout", "60")
    assert sorted((s["name"], s["state"]) for s in made) == [("web-1", "ACTIVE"),
                                                            ("web-2", "ACTIVE")]
    twin = await nubis.json("server", "create", "web-1", "--flavor", cloud.flavor_id,
                            "--image", cloud.image_id, "--network", cloud.network_id)
    assert twin["state"] == "BUILDING"  # without --wait: as CreateInstance answered
    error = await nubis.fails("server", "show", "web-1")
    assert error == ("error: more than one server named 'web-1'; give its id "
                     "(nubis.cli.ambiguous_name)")
    # No node has this trait: the scheduler finds no host and the boot ends in ERROR.
    nowhere = await nubis.json("flavor", "create", f"t1.nowhere-{uuid.uuid4().hex[:4]}",
                               "--vcpus", "1", "--ram", "64", "--disk", "1",
                               "--required-trait", "CUSTOM_NOWHERE")
    error = await nubis.fails("server", "create", "doomed", "--flavor", nowhere["id"],
                              "--image", cloud.image_id, "--network", cloud.network_id,
                              "--wait", "--timeout", "60")
    assert error.startswith("error: server doomed (") and "went to ERROR: " in error
    assert error.endswith("(nubis.cli.operation_failed)")
    [doomed] = await nubis.json("server", "list", "--filter", "name=doomed")
    assert doomed["state"] == "ERROR" and doomed["fault"] and doomed["fault"] in error
    ids = [s["id"] for s in made] + [twin["id"], doomed["id"]]
    code, _, err = await nubis("server", "delete", *ids, "--wait", "--timeout", "60")
    assert code == 0, err
    left = await cloud.wait_clean(ids)
    assert left.empty(), left


async def test_server_rebuild_by_image_name_and_addresses_by_network_name(
        nubis: Nubis, shared_cloud: ComputeCloud) -> None:
    cloud = shared_cloud
    other = await volume_harness.active_image(cloud.base, public=True)
    image_name = (await nubis.json("image", "show", other))["name"]
    made = await nubis.json("server", "create", "remade", "--flavor", cloud.flavor_id,
                            "--image", cloud.image_id, "--network", cloud.network_id,
                            "--wait", "--timeout", "60")
    rebuilt = await nubis.json("server", "rebuild", "remade", "--image", image_name,
                               "--wait", "--timeout", "60")
    assert (rebuilt["id"], rebuilt["state"], rebuilt["image_id"]) == (made["id"], "ACTIVE",
                                                                       other)
    assert rebuilt["addresses"] == made["addresses"]
    # Addresses name their network (the harness's "net-c"), in show and list alike.
    assert made["addresses"] and all(a.startswith("net-c=10.20.") for a in made["addresses"])
    assert (await nubis.json("server", "show", "remade"))["addresses"] == made["addresses"]
    listed = {s["id"]: s for s in await nubis.json("server", "list")}
    assert listed[made["id"]]["addresses"] == made["addresses"]
    actions = await nubis.json("server", "action-list", "remade")
    assert [a["action"] for a in actions][:2] == ["rebuild", "create"]
    code, _, err = await nubis("server", "delete", "remade", "--wait", "--timeout", "60")
    assert code == 0, err
    assert (await cloud.wait_clean([made["id"]])).empty()


async def test_server_create_with_a_volume_attaches_it_at_boot(nubis: Nubis,
                                                               shared_cloud: ComputeCloud) -> None:
    cloud = shared_cloud
    data = await volume_on(cloud, harness.NODES[0])
    server = await nubis.json("server", "create", "with-data", "--flavor", cloud.flavor_id,
                              "--image", cloud.image_id, "--network", cloud.network_id,
                              "--volume", data, "--wait", "--timeout", "60")
    assert server["state"] == "ACTIVE", server
    assert await volume_state(cloud, data) == volume_pb2.Volume.IN_USE
    code, _, err = await nubis("server", "delete", "with-data", "--wait", "--timeout", "60")
    assert code == 0, err
    assert await volume_state(cloud, data) == volume_pb2.Volume.AVAILABLE


async def test_server_watch_prints_each_change_as_a_json_line(nubis: Nubis,
                                                              shared_cloud: ComputeCloud) -> None:
    """`server watch` streams through the SDK's WatchInstances until stopped (here: killed)."""
    cloud = shared_cloud
    made = await nubis.json("server", "create", "watched", "--flavor", cloud.flavor_id,
                            "--image", cloud.image_id, "--network", cloud.network_id)
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.client.cli", "--lab-dir", str(nubis.lab_dir),
        "-o", "json", "server", "watch", "watched",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    states: list[str] = []
    try:
        async with asyncio.timeout(60):  # a bound on a hang, not a measure
            assert watch.stdout is not None and watch.stderr is not None
            while not states or states[-1] != "ACTIVE":
                line = await watch.stdout.readline()
                assert line, (await watch.stderr.read()).decode()
                event = json.loads(line)
                if event["type"] != "SYNCED":
                    assert event["server"]["id"] == made["id"]
                    states.append(event["server"]["state"])
    finally:
        watch.kill()
        await watch.wait()
    assert states[-1] == "ACTIVE"
    code, _, err = await nubis("server", "delete", "watched", "--wait", "--timeout", "60")
    assert code == 0, err
    assert (await cloud.wait_clean([made["id"]])).empty()
