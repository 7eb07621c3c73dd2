"""`nubis` output and errors as a person and a script see them, against a real scheduler:
`-o`/`-c` after the command, YAML, JSON errors, one-line errors with their fix, `--debug`,
names for server groups, enum values without prefixes, and shell completion."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

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


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, NUBIS_LAB_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path),
                NUBIS_IDENTITY_ADDR="127.0.0.1:1", COLUMNS="200", **extra)


@pytest.fixture
async def env(etcd: EtcdEndpoint, key_prefix: str, store: Store,
              tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The environment of a CLI that reaches a scheduler knowing one node, n1."""
    await harness.put_node(store, harness.report("n1"))
    replica = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    try:
        await harness.wait_for(lambda: _has_node(replica))
        yield _env(tmp_path, NUBIS_SCHEDULER_ADDR=replica.running.address)
    finally:
        await replica.stop()


async def _has_node(replica: harness.Replica) -> bool:
    view = replica.cache.view("n1")
    return view is not None and view.up


async def test_output_options_after_the_command(env: dict[str, str]) -> None:
    code, out, err = await nubis(env, "node", "list", "-o", "json")
    assert code == 0, err
    [row] = json.loads(out)
    assert row["name"] == "n1" and row["state"] == "UP"
    code, out, err = await nubis(env, "node", "list", "--output=yaml", "-c", "name",
                                 "-c", "state")
    assert code == 0, err
    assert yaml.safe_load(out) == [{"name": "n1", "state": "UP"}]
    code, out, err = await nubis(env, "node", "list", "-c", "state", "-c", "name")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "NAME" in line)
    assert header.index("STATE") < header.index("NAME") and "VCPUS" not in out
    code, out, err = await nubis(env, "node", "show", "n1", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["state"] == "UP", err


async def test_node_show_table_says_up(env: dict[str, str]) -> None:
    code, out, err = await nubis(env, "node", "show", "n1")
    assert code == 0, err
    assert "NODE_STATE" not in out
    assert any(line.split() == ["│", "state", "│", "UP", "│"] for line in out.splitlines()), out


async def test_json_errors_are_a_document_on_stderr(env: dict[str, str]) -> None:
    code, out, err = await nubis(env, "node", "show", "nowhere", "-o", "json")
    assert code == 1 and out == ""
    error = json.loads(err)["error"]
    assert error["code"] == "NOT_FOUND" and error["reason"] and "nowhere" in error["message"]
    code, out, err = await nubis(env, "-o", "json", "node", "list", "--filter", "colour=red")
    assert code == 1 and out == ""
    error = json.loads(err)["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert any("colour" in json.dumps(v) for v in error["field_violations"]) or (
        "colour" in error["message"])


async def test_server_group_by_name(env: dict[str, str]) -> None:
    code, out, err = await nubis(env, "-o", "json", "server-group", "create", "web",
                                 "--policy", "affinity")
    assert code == 0, err
    made = json.loads(out)
    code, out, err = await nubis(env, "server-group", "show", "web", "-o", "json")
    assert code == 0 and json.loads(out)["id"] == made["id"], err
    code, out, err = await nubis(env, "server-group", "show", "web")
    assert code == 0 and "server group web" in out, err
    code, _, err = await nubis(env, "server-group", "delete", "web")
    assert code == 0, err
    code, _, err = await nubis(env, "server-group", "show", "web")
    assert code == 1 and err.strip() == (
        "error: no server group named 'web' (nubis.cli.no_such_name)")


async def test_no_service_says_start_a_lab_and_names_the_address(tmp_path: Path) -> None:
    env = _env(tmp_path, NUBIS_SCHEDULER_ADDR="127.0.0.1:1")
    code, out, err = await nubis(env, "node", "list")
    assert code == 1 and out == ""
    [line] = err.strip().splitlines()
    assert "start one with `nubis lab up`" in line and "127.0.0.1:1" in line
    assert "Traceback" not in err
    code, _, err = await nubis(env, "node", "list", "--debug")
    assert code == 1 and "grpc details: failed to connect" in err
    assert err.strip().splitlines()[-1] == line
    code, _, err = await nubis(env, "node", "list", "-o", "json")
    assert code == 1 and "nubis lab up" in json.loads(err)["error"]["fix"]


async def test_completion_scripts_and_completion(tmp_path: Path) -> None:
    env = _env(tmp_path)
    code, out, err = await nubis(env, "completion", "bash")
    assert code == 0 and "_NUBIS_COMPLETE" in out and "complete " in out, err
    code, out, err = await nubis(env, "completion", "zsh")
    assert code == 0 and "compdef" in out, err
    code, out, _ = await nubis(dict(env, _NUBIS_COMPLETE="complete_bash",
                                    COMP_WORDS="nubis no", COMP_CWORD="1"))
    assert "node" in out.split()


async def test_a_bad_flag_with_json_output_is_a_json_error(tmp_path: Path) -> None:
    code, out, err = await nubis(_env(tmp_path), "node", "list", "--bogus", "-o", "json")
    assert code == 2 and out == ""
    error = json.loads(err)["error"]
    assert error["reason"] == "nubis.cli.usage" and "--bogus" in error["message"]
    code, _, err = await nubis(_env(tmp_path), "node", "list", "--bogus")
    assert code == 2 and "No such option: --bogus" in err and "Traceback" not in err
