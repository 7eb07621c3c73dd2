"""What `nubis server create` boots with when flags are left out: the lab's or the named
cloud's defaults, a flag always winning, and one line naming a flag nothing stands in for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.client import cli
from services.client.cli_context import CliContext
from services.client.commands import server_defaults
from services.client.commands.server_defaults import Given
from services.common import errors

LAB = {"flavor": "m1.tiny", "image": "nubis-guest", "network": "private",
       "security_group": "default"}


def _lab(tmp_path: Path, defaults: dict[str, str] | None = None) -> CliContext:
    lab = tmp_path / "lab"
    lab.mkdir()
    server_defaults.write(lab, LAB if defaults is None else defaults)
    return CliContext(lab_dir=lab)


def test_a_lab_s_defaults_fill_every_flag_left_out_and_are_said(tmp_path: Path) -> None:
    done, said = server_defaults.complete(_lab(tmp_path), Given())
    assert (done.flavor, done.image, done.networks, done.security_groups) == (
        "m1.tiny", "nubis-guest", ["private"], ["default"])
    assert len(said) == 1
    assert said[0].endswith(": --flavor m1.tiny --image nubis-guest --network private "
                            "--security-group default")
    assert server_defaults.DEFAULTS_FILE in said[0]


def test_flags_given_win_and_only_the_rest_is_taken(tmp_path: Path) -> None:
    done, said = server_defaults.complete(_lab(tmp_path), Given(
        flavor="m1.small", boot_volume="root", ports=["p1"], security_groups=["web"]))
    assert (done.flavor, done.image, done.boot_volume, done.networks, done.ports) == (
        "m1.small", "", "root", [], ["p1"])
    assert done.security_groups == ["web"]
    assert said == []


def test_without_defaults_the_missing_flag_is_named(tmp_path: Path) -> None:
    bare = CliContext(lab_dir=tmp_path / "no-lab")
    with pytest.raises(errors.InvalidArgument) as flavor:
        server_defaults.complete(bare, Given(image="lab-hello"))
    assert flavor.value.message.startswith("missing --flavor")
    assert flavor.value.reason == server_defaults.MISSING
    with pytest.raises(errors.InvalidArgument) as image:
        server_defaults.complete(_lab(tmp_path, {"flavor": "m1.tiny"}), Given())
    assert image.value.message.startswith("missing --image")
    done, _ = server_defaults.complete(bare, Given(flavor="f", image="i"))
    assert (done.networks, done.security_groups) == ([], [])  # no NIC asked, none made


def test_image_and_boot_volume_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="not both"):
        server_defaults.complete(_lab(tmp_path), Given(image="a", boot_volume="b"))


def test_a_named_cloud_s_defaults_come_from_clouds_yaml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "nubis").mkdir()
    (tmp_path / "nubis" / "clouds.yaml").write_text(
        "clouds:\n  prod:\n    identity: id.example.net:7500\n"
        "    defaults: {flavor: m1.small, image: debian-12, network: 7}\n")
    done, said = server_defaults.complete(
        CliContext(lab_dir=_lab(tmp_path).lab_dir, cloud="prod"), Given())
    assert (done.flavor, done.image, done.networks) == ("m1.small", "debian-12", [])
    assert said == ["defaults of cloud prod: --flavor m1.small --image debian-12"]


def test_the_cli_says_the_missing_flag_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NUBIS_LAB_DIR", str(tmp_path / "no-lab"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    assert cli.run(cli.app, ["server", "create", "demo", "--wait"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: missing --flavor"), err
    assert cli.run(cli.app, ["-o", "json", "server", "create", "demo"]) == 1
    document = json.loads(capsys.readouterr().err)["error"]
    assert document["reason"] == server_defaults.MISSING
