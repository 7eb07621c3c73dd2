"""`nubis lab up|status|down` run as a real CLI subprocess against real etcd, Redis and services."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from services.client.lab import components, daemons, runner, seed, state
from services.client.lab.components import LabPorts
from tests.e2e.lab_cli import HEALTHY, recorded_pids, run_cli, status_rows


def test_up_status_up_again_down(lab_dir: Path, base_port: int) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert up.returncode == 0, up.stdout + up.stderr
    pids = recorded_pids(lab_dir)
    assert {"etcd", "redis"} <= set(pids)
    assert f"127.0.0.1:{base_port + 50}" in up.stdout  # etcd's endpoint is printed

    rows = status_rows(lab_dir)
    assert [row["name"] for row in rows] == list(pids)
    for row in rows:
        assert row["alive"] is True, row
        assert row["health"] in HEALTHY, row

    _logging_in_as_another_user_keeps_the_admin(lab_dir)

    again = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already up" in again.stdout
    assert recorded_pids(lab_dir) == pids

    down = run_cli("lab", "down", "--state-dir", str(lab_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state.state_path(lab_dir).exists()
    for name, pid in pids.items():
        assert not daemons.pid_alive(pid), f"{name} (pid {pid}) still runs"
    ports = LabPorts.from_base(base_port).all()
    listening = [p for p in ports if daemons.port_open("127.0.0.1", p)]
    assert listening == []
    assert (lab_dir / "data" / "etcd").is_dir()  # data stays without --purge


@pytest.mark.slow
def test_up_seeds_an_image_and_the_default_networks_once(lab_dir: Path, base_port: int) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                 "--nodes", "1")
    assert up.returncode == 0, up.stdout + up.stderr
    seeded = _seeded(lab_dir)
    assert seeded["image"]["state"] == "ACTIVE" and seeded["image"]["visibility"] == "public"
    assert seeded["private"]["subnet"]["cidr"] == "10.0.0.0/24"
    assert seeded["public"]["network"]["external"] is True
    assert seeded["public"]["network"]["shared"] is True
    assert seeded["public"]["subnet"]["cidr"] == "203.0.113.0/24"
    assert seeded["router"]["external_network_id"] == seeded["public"]["network"]["id"]
    assert seeded["router"]["interfaces"] == [f"{seeded['private']['subnet']['id']}=10.0.0.1"]
    _a_volume_from_the_image_is_made_on_a_node(lab_dir)
    assert "flavors: m1.tiny (1 vCPU, 512 MiB, 1 GiB)" in up.stdout
    assert "nubis server create demo --flavor m1.tiny --image lab-hello --network private " \
        "--wait" in up.stdout
    _the_printed_server_boots_and_is_deleted(lab_dir)

    # What an `up` on kept data runs again: it finds every seeded resource, makes none twice.
    plan = runner.make_plan(lab_dir, nodes=1, base_port=base_port)
    context = components.PostStartContext(plan=plan, console=Console(file=io.StringIO()))
    seed.seed_image(context)
    seed.seed_networks(context)
    assert _seeded(lab_dir) == seeded


def _a_volume_from_the_image_is_made_on_a_node(lab_dir: Path) -> None:
    """The node's agent fetched the image with the lab's service credential."""
    env = {"NUBIS_LAB_DIR": str(lab_dir)}
    made = run_cli("-o", "json", "volume", "create", "boot", "--size", "1", "--image",
                   seed.IMAGE_NAME, "--wait", "--timeout", "60", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    assert json.loads(made.stdout)["state"] == "AVAILABLE"
    gone = run_cli("volume", "delete", "boot", "--wait", "--timeout", "60", env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr


def _the_printed_server_boots_and_is_deleted(lab_dir: Path) -> None:
    """What `up` prints to try first: a server of the default flavor, image and network."""
    env = {"NUBIS_LAB_DIR": str(lab_dir)}
    made = run_cli("-o", "json", "server", "create", "demo", "--flavor", "m1.tiny", "--image",
                   seed.IMAGE_NAME, "--network", seed.PRIVATE_NETWORK, "--wait", "--timeout",
                   "90", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    server = json.loads(made.stdout)
    assert (server["state"], server["power_state"]) == ("ACTIVE", "running")
    assert "=10.0.0." in server["addresses"][0]  # on the private subnet
    gone = run_cli("server", "delete", "demo", "--wait", "--timeout", "90", env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    listed = run_cli("-o", "json", "server", "list", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout


def _seeded(lab_dir: Path) -> dict[str, Any]:
    """What `lab up` seeded, as the CLI lists it (each name exactly once)."""
    env = {"NUBIS_LAB_DIR": str(lab_dir)}

    def listed(*argv: str) -> list[dict[str, Any]]:
        done = run_cli("-o", "json", *argv, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    [image] = listed("image", "list", "--filter", f"name={seed.IMAGE_NAME}")
    found: dict[str, Any] = {"image": {k: image[k] for k in ("id", "state", "visibility")}}
    networks, subnets = listed("network", "list"), listed("subnet", "list")
    for network, subnet in ((seed.PRIVATE_NETWORK, seed.PRIVATE_SUBNET),
                            (seed.PUBLIC_NETWORK, seed.PUBLIC_SUBNET)):
        [net] = [n for n in networks if n["name"] == network]
        [sub] = [s for s in subnets if s["network_id"] == net["id"]]
        assert sub["name"] == subnet
        found[network] = {"network": {k: net[k] for k in ("id", "external", "shared")},
                          "subnet": {k: sub[k] for k in ("id", "cidr")}}
    [router] = listed("router", "list", "--filter", f"name={seed.ROUTER}")
    found["router"] = {k: router[k] for k in ("id", "external_network_id", "interfaces")}
    return found


def test_missing_etcd_binary_names_the_package(lab_dir: Path, base_port: int,
                                               tmp_path: Path) -> None:
    # A PATH holding redis-server but no etcd.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(daemons.require_binary("redis-server"))
    result = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                     env={"PATH": str(bin_dir)})
    assert result.returncode != 0
    assert "apt-get install -y etcd-server" in result.stderr
    assert "Traceback" not in result.stderr
    assert not state.state_path(lab_dir).exists()


def test_busy_port_is_named_with_a_way_out(lab_dir: Path, base_port: int) -> None:
    busy = base_port + 50  # etcd's client port in this layout
    with socket.socket() as listener:
        # Like any server: a port left in TIME_WAIT by an earlier lab is still bindable.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", busy))
        listener.listen()
        result = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert result.returncode == 1
    assert f"port {busy}" in result.stderr
    assert "--base-port" in result.stderr
    assert "Traceback" not in result.stderr


def test_reused_pid_is_neither_trusted_nor_stopped(lab_dir: Path, base_port: int) -> None:
    # lab.json names a live process that is not the one the lab started (PID reuse).
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        fake = state.LabState(state_dir=str(lab_dir), host="127.0.0.1", created=0.0, processes=[
            state.ProcessRecord(name="etcd", pid=stranger.pid, argv=["/usr/bin/etcd"],
                                readiness="tcp", wave=0, log="", port=base_port + 50,
                                start_ticks=1)])
        state.save(fake, lab_dir)
        up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                     "--nodes", "0")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "already up" not in up.stdout
        assert stranger.pid not in recorded_pids(lab_dir).values()
        down = run_cli("lab", "down", "--state-dir", str(lab_dir), "--purge")
        assert down.returncode == 0, down.stdout + down.stderr
        assert stranger.poll() is None, "down stopped a process it did not start"
        assert not lab_dir.exists()  # --purge leaves nothing of the lab
    finally:
        stranger.kill()
        stranger.wait()


def _kill(pid: int) -> None:
    """SIGKILL a lab process (a crash) and wait until it is gone."""
    os.killpg(pid, signal.SIGKILL)
    daemons.stop_pids([pid], 5)  # reaps nothing (not our child); waits until gone


@pytest.mark.slow
def test_up_restarts_only_the_dead_parts_of_a_lab(lab_dir: Path, base_port: int) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert up.returncode == 0, up.stdout + up.stderr
    pids = recorded_pids(lab_dir)
    crashed = ["redis", "nubis-scheduler", "nubis-agent-2"]
    for name in crashed:
        _kill(pids[name])

    result = run_cli("-o", "json", "lab", "status", "--state-dir", str(lab_dir))
    assert result.returncode == 1
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name in crashed:
        assert rows[name]["alive"] is False and rows[name]["health"] == "stopped"
    assert rows["etcd"]["alive"] is True

    # Without --base-port: the lab restarts on the layout it was recorded with.
    again = run_cli("lab", "up", "--state-dir", str(lab_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    line = next(line for line in again.stdout.splitlines() if line.startswith("Restarted: "))
    assert set(line.removeprefix("Restarted: ").split(" (")[0].split(", ")) == set(crashed)
    after = recorded_pids(lab_dir)
    assert {name: pid for name, pid in after.items() if name not in crashed} == {
        name: pid for name, pid in pids.items() if name not in crashed}
    for name in crashed:
        assert after[name] != pids[name] and daemons.pid_alive(after[name])
    for row in status_rows(lab_dir):
        assert row["alive"] is True and row["health"] in HEALTHY, row

    down = run_cli("lab", "down", "--state-dir", str(lab_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(daemons.pid_alive(pid) for pid in after.values())


def test_down_leaves_alone_what_already_died(lab_dir: Path, base_port: int) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                 "--nodes", "0")
    assert up.returncode == 0, up.stdout + up.stderr
    pids = recorded_pids(lab_dir)
    _kill(pids["redis"])
    down = run_cli("lab", "down", "--state-dir", str(lab_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Already gone (left alone): redis" in down.stdout
    assert not any(daemons.pid_alive(pid) for pid in pids.values())


def test_status_without_a_lab_is_one_clean_line(tmp_path: Path) -> None:
    result = run_cli("lab", "status", "--state-dir", str(tmp_path / "none"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: no lab is recorded in")
    assert "(nubis.lab.not_running)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _logging_in_as_another_user_keeps_the_admin(lab_dir: Path) -> None:
    """The bootstrap's admin credentials survive `nubis login` as someone else."""
    admin_file = lab_dir / "admin-credentials.json"
    assert admin_file.stat().st_mode & 0o777 == 0o600
    admin = json.loads(admin_file.read_text())
    assert admin["password"] and admin["token"]
    session = json.loads((lab_dir / "credentials.json").read_text())
    assert session["token"] == admin["token"] and "password" not in session
    env = {"NUBIS_LAB_DIR": str(lab_dir)}
    made = run_cli("user", "create", "bob", "--password", "bob's long password", env=env)
    assert made.returncode == 0, made.stdout + made.stderr
    granted = run_cli("role", "grant", "bob", "reader", "--project", "admin", env=env)
    assert granted.returncode == 0, granted.stdout + granted.stderr
    bob = run_cli("login", "-u", "bob", "--password", "bob's long password", "-p", "admin",
                  env=env)
    assert bob.returncode == 0, bob.stdout + bob.stderr
    assert json.loads(admin_file.read_text()) == admin
    back = run_cli("login", "-u", admin["username"], "--password", admin["password"],
                   "-p", "admin", env=env)
    assert back.returncode == 0, back.stdout + back.stderr
