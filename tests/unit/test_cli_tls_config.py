"""Where the CLI finds its TLS settings: the lab's nubis.toml, else the user config."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.client.cli_context import CliContext


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_lab_config_wins_over_the_user_config(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    _write(tmp_path / "home" / "nubis" / "config.toml",
           '[tls]\nenabled = true\nca_file = "/etc/my-ca.pem"\n')
    lab = tmp_path / "lab"
    cli = CliContext(lab_dir=lab)
    user = cli.tls()
    assert user is not None and user.ca_file == "/etc/my-ca.pem" and user.cert_file is None

    _write(lab / "nubis.toml", 'redis_url = "x"\n\n[tls]\nenabled = true\nca_file = "/lab/ca.pem"\n'
           'cert_file = "/lab/client.pem"\nkey_file = "/lab/client.key"\n')
    found = cli.tls()
    assert found is not None
    assert (found.ca_file, found.cert_file, found.key_file) == (
        "/lab/ca.pem", "/lab/client.pem", "/lab/client.key")


def test_a_plaintext_lab_is_dialed_in_plaintext_whatever_the_user_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    _write(tmp_path / "home" / "nubis" / "config.toml",
           '[tls]\nenabled = true\nca_file = "/etc/my-ca.pem"\n')
    lab = tmp_path / "lab"
    _write(lab / "nubis.toml", 'redis_url = "x"\n')
    assert CliContext(lab_dir=lab).tls() is None


def test_tls_disabled_dials_in_plaintext(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    _write(tmp_path / "home" / "nubis" / "config.toml", "[tls]\nenabled = false\n")
    assert CliContext(lab_dir=tmp_path / "no-lab").tls() is None
