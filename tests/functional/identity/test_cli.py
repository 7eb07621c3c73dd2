"""The `nubis` identity commands end to end: login, projects, users, roles, quota, tokens."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from tests.functional.authz.world import ADMIN_PASSWORD, PASSWORD, World


async def _nubis(world: World, home: Path, *args: str, ok: bool = True,
                 typed: str = "") -> Any:
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "NUBIS_LAB_DIR": str(home / "no-lab")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.client.cli", "--identity", world.address, "-o", "json",
        *args, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(typed.encode())
    assert (proc.returncode == 0) == ok, (args, out.decode(), err.decode())
    text = out.decode().strip()
    if typed:  # without a terminal the password prompts land on stdout before the reply
        text = text.rsplit("password:", 1)[-1]
    return json.loads(text) if ok and text else err.decode()


async def test_cli_session(world: World, tmp_path: Path) -> None:
    await _nubis(world, tmp_path, "login", "-u", "admin", "--password", ADMIN_PASSWORD,
                 "-p", "admin")
    saved = json.loads((tmp_path / "nubis" / "credentials.json").read_text())
    assert "password" not in saved and saved["token"]

    name = f"cli-{uuid.uuid4().hex[:6]}"
    project = await _nubis(world, tmp_path, "project", "create", name, "--description", "x")
    listed = await _nubis(world, tmp_path, "project", "list", "--all-projects")
    assert project["id"] in {p["id"] for p in listed}
    named = await _nubis(world, tmp_path, "project", "list", "--all-projects",
                         "--filter", f"name={name} state=ENABLED")
    assert [(p["id"], p["state"]) for p in named] == [(project["id"], "ENABLED")]
    error = await _nubis(world, tmp_path, "project", "list", "--filter", "colour=red", ok=False)
    assert "INVALID_ARGUMENT" in error

    user = await _nubis(world, tmp_path, "user", "create", f"{name}-u", "--password",
                        "long enough pw", "--project", project["id"])
    await _nubis(world, tmp_path, "role", "grant", user["id"], "member", "--project",
                 project["id"])
    roles = await _nubis(world, tmp_path, "role", "list", "--project", project["id"])
    assert [(r["user_id"], r["role"]) for r in roles] == [(user["id"], "member")]

    limits = await _nubis(world, tmp_path, "quota", "set", project["id"], "instances=2")
    assert {"resource": "instances", "limit": 2} in limits
    error = await _nubis(world, tmp_path, "quota", "set", project["id"], "gpus=1", ok=False)
    assert "INVALID_ARGUMENT" in error
    reset = await _nubis(world, tmp_path, "quota", "reset", project["id"], "instances")
    assert {"resource": "instances", "limit": 2} not in reset

    issued = await _nubis(world, tmp_path, "token", "issue", "-u", f"{name}-u", "--password",
                          "long enough pw")
    assert issued["project_id"] == project["id"] and issued["roles"] == ["member"]

    endpoints = await _nubis(world, tmp_path, "catalog", "list")
    assert "identity" in {e["name"] for e in endpoints}

    await _nubis(world, tmp_path, "token", "revoke")
    error = await _nubis(world, tmp_path, "project", "list", ok=False)
    assert "UNAUTHENTICATED" in error


async def test_names_stand_for_ids(world: World, tmp_path: Path) -> None:
    await _nubis(world, tmp_path, "login", "-u", "admin", "--password", ADMIN_PASSWORD,
                 "-p", "admin")
    name = f"named-{uuid.uuid4().hex[:6]}"
    project = await _nubis(world, tmp_path, "project", "create", name)
    user = await _nubis(world, tmp_path, "user", "create", f"{name}-u", "--password",
                        "long enough pw", "--project", name)
    assert user["default_project_id"] == project["id"]

    await _nubis(world, tmp_path, "role", "grant", f"{name}-u", "reader", "--project", name)
    roles = await _nubis(world, tmp_path, "role", "list", "--project", name, "--user",
                         f"{name}-u")
    assert [(r["user_id"], r["project_id"], r["role"]) for r in roles] == [
        (user["id"], project["id"], "reader")]
    shown = await _nubis(world, tmp_path, "project", "show", name)
    assert shown["id"] == project["id"]
    limits = await _nubis(world, tmp_path, "quota", "set", name, "instances=3")
    assert {"resource": "instances", "limit": 3} in limits

    error = await _nubis(world, tmp_path, "role", "grant", "nobody-by-this-name", "reader",
                         "--project", name, ok=False)
    assert "no user named 'nobody-by-this-name'" in error and "Traceback" not in error
    await _nubis(world, tmp_path, "role", "revoke", f"{name}-u", "reader", "--project", name)
    assert await _nubis(world, tmp_path, "role", "list", "--project", name) == []


async def test_changing_your_own_password_asks_for_the_current_one(
    world: World, tmp_path: Path,
) -> None:
    name = f"own-{uuid.uuid4().hex[:6]}"
    await world.make_user(name, world.project_a, "member")
    await _nubis(world, tmp_path, "login", "-u", name, "--password", PASSWORD,
                 "-p", world.project_a)
    typed_wrong = "a new password\na new password\nnot my password\n"
    error = await _nubis(world, tmp_path, "user", "update", name, "--password", ok=False,
                         typed=typed_wrong)
    assert "PERMISSION_DENIED" in error and "original password is wrong" in error
    typed = f"a new password\na new password\n{PASSWORD}\n"
    await _nubis(world, tmp_path, "user", "update", name, "--password", typed=typed)
    await world.login(name, world.project_a, password="a new password")


async def test_quota_defaults_from_the_cli(world: World, tmp_path: Path) -> None:
    await _nubis(world, tmp_path, "login", "-u", "admin", "--password", ADMIN_PASSWORD,
                 "-p", "admin")
    shown = {row["resource"]: row["limit"]
             for row in await _nubis(world, tmp_path, "quota", "defaults")}
    changed = await _nubis(world, tmp_path, "quota", "set-default",
                           f"routers={shown['routers'] + 1}")
    assert {"resource": "routers", "limit": shown["routers"] + 1} in changed
    error = await _nubis(world, tmp_path, "quota", "set-default", "gpus=1", ok=False)
    assert "INVALID_ARGUMENT" in error
    # The other tests of the package share these defaults: put the value back.
    restored = await _nubis(world, tmp_path, "quota", "set-default", f"routers={shown['routers']}")
    assert {"resource": "routers", "limit": shown["routers"]} in restored
