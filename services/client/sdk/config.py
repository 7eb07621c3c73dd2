"""Where a cloud is and who calls it: the lookup the `nubis` CLI and the SDK share.

Endpoints and credentials are looked up in order: the command line, the named
cloud (`--cloud NAME` / `NUBIS_CLOUD`, from `clouds.yaml` in the user's config
dir, as openstackclient's), the lab state dir (`NUBIS_LAB_DIR`, default
`./.nubis-lab`: lab.json, credentials.json), then `~/.config/nubis/config.toml`,
then the defaults of Settings. `NUBIS_TOKEN` overrides every stored token.

clouds.yaml::

    clouds:
      prod:
        identity: identity.example.net:7500    # host:port of the catalog
        ca_file: /etc/nubis/ca.pem             # optional: dial with TLS
        cert_file: ~/.config/nubis/me.pem      # optional: mTLS
        key_file: ~/.config/nubis/me.key
        credentials: ~/.config/nubis/prod.json # optional: where `nubis login` keeps it
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common import errors
from services.common.settings import TlsSettings

DEFAULT_LAB_DIR = ".nubis-lab"
CREDENTIALS_FILE = "credentials.json"
LAB_CONFIG_FILE = "nubis.toml"
CLOUDS_FILE = "clouds.yaml"


def default_lab_dir() -> Path:
    return Path(os.environ.get("NUBIS_LAB_DIR") or DEFAULT_LAB_DIR)


def user_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nubis"


@dataclass
class CloudConfig:
    """Where one cloud is and how to reach it, as the CLI and the SDK look it up."""

    identity: str | None = None
    lab_dir: Path = field(default_factory=default_lab_dir)
    cloud: str | None = None
    """The named cloud of clouds.yaml to use (`--cloud`, `NUBIS_CLOUD`); None: the lab's."""

    def cloud_config(self) -> dict[str, Any]:
        """The `clouds.<name>` table of clouds.yaml, {} without --cloud."""
        if not self.cloud:
            return {}
        clouds = _read_yaml(user_config_dir() / CLOUDS_FILE).get("clouds")
        found = clouds.get(self.cloud) if isinstance(clouds, dict) else None
        if not isinstance(found, dict):
            raise errors.NotFound(
                f"no cloud named {self.cloud!r} in {user_config_dir() / CLOUDS_FILE}",
                reason="nubis.cli.no_such_cloud")
        return found

    def credentials_path(self) -> Path:
        """Where `nubis login` keeps the token: the cloud's file, the lab's dir when inside
        a lab, else the user's config dir."""
        cloud = self.cloud_config()
        if cloud:
            named = cloud.get("credentials")
            return (Path(named).expanduser() if isinstance(named, str)
                    else user_config_dir() / f"credentials-{self.cloud}.json")
        if (self.lab_dir / "lab.json").is_file():
            return self.lab_dir / CREDENTIALS_FILE
        return user_config_dir() / CREDENTIALS_FILE

    def identity_address(self) -> str:
        """host:port of the identity service."""
        if self.identity:
            return self.identity
        cloud = self.cloud_config().get("identity")
        if isinstance(cloud, str):
            return cloud
        lab = _read_json(self.lab_dir / "lab.json")
        endpoint = lab.get("endpoints", {}).get("nubis-identity") if lab else None
        if isinstance(endpoint, str):
            return endpoint
        configured = _user_config().get("identity")
        return configured if isinstance(configured, str) else "127.0.0.1:7500"

    def token(self) -> str | None:
        """The bearer token to send: NUBIS_TOKEN, else the lab's stored credentials, else the
        user config's."""
        explicit = os.environ.get("NUBIS_TOKEN")
        if explicit:
            return explicit
        if self.cloud:
            stored = _read_json(self.credentials_path())
            token = stored.get("token") if stored else None
            return token if isinstance(token, str) and token else None
        stored = _read_json(self.lab_dir / CREDENTIALS_FILE) or _read_json(
            user_config_dir() / CREDENTIALS_FILE)
        token = stored.get("token") if stored else None
        return token if isinstance(token, str) and token else None

    def tls(self) -> TlsSettings | None:
        """How to dial with TLS: the named cloud's ca_file (with cert_file and key_file for
        mTLS), else the `[tls]` table of the lab's nubis.toml (written by `nubis lab up
        --tls`; a lab without one is plaintext), else, with no lab, of the user config;
        None dials in plaintext."""
        cloud = self.cloud_config()
        if isinstance(cloud.get("ca_file"), str):
            files = {key: str(Path(cloud[key]).expanduser())
                     for key in ("ca_file", "cert_file", "key_file")
                     if isinstance(cloud.get(key), str)}
            return TlsSettings(enabled=True, **files)
        lab_config = self.lab_dir / LAB_CONFIG_FILE
        table = _read_toml(lab_config) if lab_config.is_file() else _user_config()
        section = table.get("tls")
        if not isinstance(section, dict):
            return None
        settings = TlsSettings.model_validate(section)
        return settings if settings.enabled else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _user_config() -> dict[str, Any]:
    return _read_toml(user_config_dir() / "config.toml")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
