"""A person's first hour with nubis, run as real `nubis` subprocesses against a real lab.

`nubis lab up` (test driver, 2 nodes), a mistyped password, then the right one; a network
and a subnet; an image uploaded with its progress drawn on a terminal; a server booted with
`--wait` on a terminal (its state drawn as it goes); a volume attached (first one on the
other node, which is refused in one line); the server read back as JSON, YAML and picked
columns; a bad flag and a missing server, each one line; then everything deleted and the
lab taken down. Every step checks the exit code and what was printed.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.client.lab import state
from tests.e2e.lab_cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CIDR = "192.168.77.0/24"


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return done.stdout


def _one_line_error(done: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    """The error a person reads: exit code, one line on stderr, nothing on stdout."""
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _on_a_terminal(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """`nubis ARGS` with its output on a pseudo-terminal, as in a person's shell."""
    master, slave = pty.openpty()
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUBIS_")}
    proc = subprocess.Popen([sys.executable, "-m", "services.client.cli", *args],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                            env={**base, "COLUMNS": "120", "TERM": "xterm", **env})
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the other end closed: the command is done
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, b"".join(chunks).decode(errors="replace")


def _json(*args: str, env: dict[str, str]) -> Any:
    return json.loads(_ok(run_cli("-o", "json", *args, env=env)))


def _names(kind: str, env: dict[str, str]) -> set[str]:
    return {row["name"] for row in _json(kind, "list", env=env)}


def test_a_person_goes_from_lab_up_to_lab_down(lab_dir: Path, base_port: int,
                                               tmp_path: Path) -> None:
    _ok(run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                "--nodes", "2", "--driver", "test", timeout=180))
    env = {"NUBIS_LAB_DIR": str(lab_dir)}
    _log_in(lab_dir, env)
    _ok(run_cli("network", "create", "demo-net", env=env))
    _ok(run_cli("subnet", "create", "demo-subnet", "--network", "demo-net", "--cidr", CIDR,
                env=env))
    _upload_image(tmp_path, env)
    server = _boot(env)
    _compute_counted_the_spawn(lab_dir)
    data = _attach_a_volume(server, env)
    _read_the_server_back(data, env)
    _mistakes_are_one_line(env)
    _delete_everything(env)
    down = run_cli("lab", "down", "--state-dir", str(lab_dir), "--grace", "3")
    assert "Stopped: " in _ok(down)
    _one_line_error(run_cli("lab", "status", "--state-dir", str(lab_dir)))


def _log_in(lab_dir: Path, env: dict[str, str]) -> None:
    admin = json.loads((lab_dir / "admin-credentials.json").read_text())
    wrong = _one_line_error(run_cli("login", "-u", admin["username"], "--password",
                                    "not the password", "-p", "admin", env=env))
    assert "UNAUTHENTICATED" in wrong and "invalid username or password" in wrong
    assert "check the user name, password and project" in wrong
    assert "run `nubis login`" not in wrong  # that is what just failed
    # The refused login left the lab's session alone.
    _ok(run_cli("server", "list", env=env))
    said = _ok(run_cli("login", "-u", admin["username"], "--password", admin["password"],
                       "-p", "admin", env=env))
    assert said.startswith(f"logged in as {admin['username']} on project admin")


def _upload_image(tmp_path: Path, env: dict[str, str]) -> None:
    disk = tmp_path / "demo.raw"
    disk.write_bytes(os.urandom(3 * 1024 * 1024))
    code, drawn = _on_a_terminal("image", "create", "demo-img", "--file", str(disk),
                                 "--disk-format", "raw", env=env)
    assert code == 0, drawn
    assert "checksum" in drawn and "upload" in drawn and "3.1/3.1 MB" in drawn, drawn
    assert "ACTIVE" in drawn and "Traceback" not in drawn
    image = _json("image", "show", "demo-img", env=env)
    assert (image["state"], int(image["size_bytes"])) == ("ACTIVE", disk.stat().st_size)


def _boot(env: dict[str, str]) -> dict[str, Any]:
    code, drawn = _on_a_terminal("server", "create", "demo", "--flavor", "m1.tiny", "--image",
                                 "demo-img", "--network", "demo-net", "--wait", "--timeout",
                                 "120", env=env, timeout=150)
    assert code == 0, drawn
    assert "BUILDING" in drawn, drawn  # the state was drawn as it went
    assert "server demo (" in drawn and "ACTIVE after" in drawn, drawn
    server: dict[str, Any] = _json("server", "show", "demo", env=env)
    assert (server["state"], server["power_state"]) == ("ACTIVE", "running")
    return server


def _compute_counted_the_spawn(lab_dir: Path) -> None:
    """nubis-compute's /metrics counts the spawn its task sender sent, and its outcome."""
    lab = state.load(lab_dir)
    assert lab is not None
    [compute] = [p for p in lab.processes if p.name == "nubis-compute"]
    url = f"http://{lab.host}:{compute.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {(s.name, s.labels.get("task"), s.labels.get("outcome")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    spawn = "nubis.agent.compute.spawn"
    assert samples[("nubis_task_sender_sent_total", spawn, None)] >= 1
    assert samples[("nubis_task_sender_outcomes_total", spawn, "ok")] >= 1


def _attach_a_volume(server: dict[str, Any], env: dict[str, str]) -> str:
    """A volume on the other node is refused in one line; one on the server's node attaches."""
    node = server["node"]
    other = "node-1" if node == "node-2" else "node-2"
    _ok(run_cli("volume", "create", "elsewhere", "--size", "1", "--node", other, "--wait",
                env=env))
    refused = _one_line_error(run_cli("server", "add-volume", "demo", "elsewhere", env=env))
    assert "FAILED_PRECONDITION" in refused and "own node" in refused
    assert "(nubis.volume.other_node)" in refused
    made = _json("volume", "create", "data", "--size", "1", "--node", node, "--wait", env=env)
    assert made["state"] == "AVAILABLE"
    _ok(run_cli("server", "add-volume", "demo", "data", "--wait", env=env))
    return str(made["id"])


def _read_the_server_back(data_id: str, env: dict[str, str]) -> None:
    shown = _json("server", "show", "demo", env=env)
    assert shown["state"] == "ACTIVE" and shown["task_state"] == ""
    [address] = shown["addresses"]
    assert address.split("=")[1].startswith("192.168.77.")
    attached = {v["volume_id"]: v for v in shown["volumes"]}
    assert data_id in attached and attached[data_id]["device_name"] == "vdb"
    assert attached[shown["root_volume_id"]]["boot"] is True
    as_yaml = yaml.safe_load(_ok(run_cli("-o", "yaml", "server", "show", "demo", env=env)))
    assert as_yaml == shown
    picked = _json("server", "show", "demo", "-c", "state", "-c", "name", env=env)
    assert list(picked.items()) == [("state", "ACTIVE"), ("name", "demo")]
    table = _ok(run_cli("server", "list", "-c", "name", "-c", "state", env=env))
    assert "demo" in table and "ACTIVE" in table and "project_id" not in table.lower()
    volume = _json("volume", "show", "data", "-c", "state", "-c", "attached_to", env=env)
    assert volume == {"state": "IN_USE", "attached_to": [f"{shown['id']}:vdb"]}


def _mistakes_are_one_line(env: dict[str, str]) -> None:
    flag = _one_line_error(run_cli("server", "show", "demo", "--bogus", env=env), exit_code=2)
    assert "No such option: --bogus" in flag and "`nubis server show --help`" in flag
    missing = _one_line_error(run_cli("server", "show", "nope", env=env))
    assert "no server named 'nope'" in missing
    document = run_cli("-o", "json", "server", "show", "nope", env=env)
    assert document.returncode == 1 and document.stdout == ""
    assert json.loads(document.stderr)["error"]["code"] == "NOT_FOUND"


def _delete_everything(env: dict[str, str]) -> None:
    _ok(run_cli("server", "delete", "demo", "--wait", "--timeout", "120", env=env))
    for volume in ("data", "elsewhere"):  # data was detached by the server's delete
        _ok(run_cli("volume", "delete", volume, "--wait", env=env))
    _ok(run_cli("image", "delete", "demo-img", env=env))
    _ok(run_cli("subnet", "delete", "demo-subnet", env=env))
    _ok(run_cli("network", "delete", "demo-net", env=env))
    assert _json("server", "list", env=env) == []
    # The server's root volume went with it (delete_on_termination).
    assert _json("volume", "list", env=env) == []
    assert "demo-img" not in _names("image", env)  # the lab's own image stays
    assert "demo-subnet" not in _names("subnet", env)
    assert "demo-net" not in _names("network", env)
