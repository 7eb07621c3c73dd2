"""`nubis login|logout|token issue|quota` as a person uses them against a real identity:
credentials at 0600, the login reused, the token printed whole, NUBIS_TOKEN, named clouds,
both quota forms, and the fix named when the token is gone."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import uuid
from pathlib import Path

from tests.functional.authz.world import ADMIN_PASSWORD, World


async def _run(home: Path, *args: str, **env: str) -> tuple[int, str, str]:
    full = {**os.environ, "XDG_CONFIG_HOME": str(home), "NUBIS_LAB_DIR": str(home / "no-lab"),
            "COLUMNS": "80", **env}
    full.pop("NUBIS_TOKEN", None) if "NUBIS_TOKEN" not in env else None
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.client.cli", *args, env=full,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def _login(world: World, home: Path, *extra: str) -> None:
    code, _, err = await _run(home, "--identity", world.address, *extra, "login", "-u", "admin",
                              "--password", ADMIN_PASSWORD, "-p", "admin")
    assert code == 0, err


async def test_login_token_issue_and_logout(world: World, tmp_path: Path) -> None:
    await _login(world, tmp_path)
    saved = tmp_path / "nubis" / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    token = json.loads(saved.read_text())["token"]

    # The login's user and project, the token shown whole even in a narrow table.
    code, out, err = await _run(tmp_path, "--identity", world.address, "token", "issue",
                                "--password", ADMIN_PASSWORD)
    assert code == 0, err
    assert "token of admin" in out and "Username" not in out
    shown = _value_of("token", out)
    issued = json.loads((await _run(tmp_path, "--identity", world.address, "token", "issue",
                                    "--password", ADMIN_PASSWORD, "-o", "json"))[1])
    assert issued["token"] != token and shown.count(".") == 2 and len(shown) > 200
    # Without a password: the current login's token, nothing asked.
    code, out, err = await _run(tmp_path, "--identity", world.address, "-o", "json", "token",
                                "issue")
    assert code == 0, err
    assert json.loads(out)["token"] == token

    code, out, err = await _run(tmp_path, "--identity", world.address, "logout")
    assert code == 0 and not saved.exists(), err
    code, out, err = await _run(tmp_path, "--identity", world.address, "project", "list")
    assert code == 1 and "run `nubis login`" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # The token logout forgot was revoked too; NUBIS_TOKEN sends it anyway.
    code, _, err = await _run(tmp_path, "--identity", world.address, "project", "list",
                              NUBIS_TOKEN=token)
    assert code == 1 and "UNAUTHENTICATED" in err and "nubis login" in err
    code, _, err = await _run(tmp_path, "--identity", world.address, "project", "list",
                              "-o", "json", NUBIS_TOKEN=shown)  # the table's token works
    assert code == 0, err


def _value_of(field: str, table: str) -> str:
    """The value of `field` in a record table, its folded lines joined."""
    value, inside = "", False
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        if len(cells) != 2:
            continue
        if cells[0]:
            inside = cells[0] == field
        if inside:
            value += cells[1]
    return value


async def test_named_cloud_keeps_its_own_credentials(world: World, tmp_path: Path) -> None:
    config = tmp_path / "nubis"
    config.mkdir()
    (config / "clouds.yaml").write_text(
        f"clouds:\n  here:\n    identity: '{world.address}'\n"
        f"    credentials: '{tmp_path / 'here.json'}'\n"
        "  nowhere:\n    identity: '127.0.0.1:1'\n")
    await _login(world, tmp_path, "--cloud", "here")
    assert stat.S_IMODE((tmp_path / "here.json").stat().st_mode) == 0o600
    assert not (config / "credentials.json").exists()
    code, out, err = await _run(tmp_path, "project", "list", "-o", "json", NUBIS_CLOUD="here")
    assert code == 0 and "admin" in {p["name"] for p in json.loads(out)}, err
    code, _, err = await _run(tmp_path, "project", "list", "--cloud", "nowhere")
    assert code == 1 and "127.0.0.1:1" in err and "nubis lab up" in err
    code, _, err = await _run(tmp_path, "project", "list", "--cloud", "elsewhere")
    assert code == 1 and "no cloud named 'elsewhere'" in err


async def test_quota_takes_the_project_either_way(world: World, tmp_path: Path) -> None:
    await _login(world, tmp_path)
    name = f"quota-{uuid.uuid4().hex[:6]}"
    base = ("--identity", world.address, "-o", "json")
    assert (await _run(tmp_path, *base, "project", "create", name))[0] == 0

    async def limit(*args: str) -> int:
        code, out, err = await _run(tmp_path, *base, "quota", *args)
        assert code == 0, err
        return int({row["resource"]: row["limit"] for row in json.loads(out)}["instances"])

    assert await limit("set", "--project", name, "instances=4") == 4
    assert await limit("show", "--project", name) == 4
    assert await limit("show", name) == 4
    assert await limit("set", name, "instances=5") == 5
    assert await limit("reset", "--project", name, "instances") != 5
    code, out, err = await _run(tmp_path, "--identity", world.address, "quota", "show", name)
    assert code == 0 and f"quota of project {name}" in out, err


async def test_services_are_found_in_the_catalog_before_a_stale_lab_record(
    world: World, tmp_path: Path,
) -> None:
    await _login(world, tmp_path)
    lab = tmp_path / "no-lab"
    lab.mkdir()
    # A scheduler replica that died: the lab recorded it, the catalog lists the live one.
    (lab / "lab.json").write_text(json.dumps({"endpoints": {"nubis-scheduler": "127.0.0.1:1"}}))
    code, out, err = await _run(tmp_path, "--identity", world.address, "node", "list",
                                "-o", "json")
    assert code == 0 and isinstance(json.loads(out), list), err
