"""`nubis network|subnet|port|router|security-group ...` against the real network service."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.functional.cli_runner import Nubis
from tests.functional.network.harness import NetCloud


@pytest.fixture
def nubis(cloud: NetCloud, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
          tmp_path: Path) -> Nubis:
    """The CLI as project A's admin (routers and ports are members' business)."""
    return Nubis.configure(monkeypatch, capsys, tmp_path / "cli", cloud.world.tokens["a_admin"],
                           identity=cloud.world.address,
                           network=cloud.network.running.address)


async def test_security_group_and_rule_commands(nubis: Nubis) -> None:
    name = f"web-{uuid.uuid4().hex[:6]}"
    group = await nubis.json("security-group", "create", name, "--description", "web")
    assert group["name"] == name and len(group["rules"]) == 2  # the default egress rules
    rule = await nubis.json("security-group-rule", "create", name, "--protocol", "tcp",
                            "--port", "8000:8080", "--remote-ip", "10.0.0.0/8")
    assert (rule["direction"], rule["ports"], rule["remote"]) == ("ingress", "8000:8080",
                                                                  "10.0.0.0/8")
    rules = await nubis.json("security-group-rule", "list", "--group", name)
    assert rule["id"] in {r["id"] for r in rules} and len(rules) == 3
    shown = await nubis.json("security-group", "show", group["id"])
    assert len(shown["rules"]) == 3
    assert name in {g["name"] for g in await nubis.json("security-group", "list")}

    error = await nubis.fails("security-group-rule", "create", name, "--protocol", "tcp",
                              "--port", "0:70000")
    assert error.startswith("error: INVALID_ARGUMENT") and "port_range" in error
    code, _, _ = await nubis("security-group-rule", "delete", rule["id"])
    assert code == 0
    code, _, _ = await nubis("security-group", "delete", name)
    assert code == 0
    error = await nubis.fails("security-group", "show", name)
    assert "NOT_FOUND" in error or "no security group named" in error
