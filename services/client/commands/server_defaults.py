"""What `nubis server create` boots with when flags are left out: the cloud's defaults.

A lab writes its own (`server-defaults.json` in its state dir: the flavor,
the image it registered, its private network and the default security
group), so `nubis server create demo --wait` needs no other flag there. A
named cloud may carry the same table in clouds.yaml::

    clouds:
      prod:
        identity: identity.example.net:7500
        defaults: {flavor: m1.small, image: debian-12, network: web, security_group: web}

A flag given always wins; every default taken is said on stderr (in JSON mode)
or the terminal, so the output names what was picked. Without a default or a
flag for the flavor or the image, the error is one line naming the missing
flag. A network (or a security group) without a default stays unset, as
before: a server may boot without NICs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.client.cli_context import CliContext
from services.common import errors

DEFAULTS_FILE = "server-defaults.json"
"""The file a lab writes into its state dir."""
FIELDS = ("flavor", "image", "network", "security_group")
"""The keys of a defaults table."""
MISSING = "nubis.cli.missing_flag"


@dataclass(frozen=True)
class Given:
    """The flags of `server create` that a default can stand in for."""

    flavor: str = ""
    image: str = ""
    boot_volume: str = ""
    networks: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)


def lab_file(state_dir: Path) -> Path:
    return state_dir / DEFAULTS_FILE


def write(state_dir: Path, defaults: dict[str, str]) -> Path:
    """Write a lab's defaults (only the known keys with a value); the file's path."""
    path = lab_file(state_dir)
    kept = {key: defaults[key] for key in FIELDS if defaults.get(key)}
    path.write_text(json.dumps(kept, indent=2) + "\n")
    return path


def configured(cli: CliContext) -> tuple[dict[str, str], str]:
    """The defaults of the cloud in use and where they come from ({} and "" without)."""
    if cli.cloud:
        return _table(cli.cloud_config().get("defaults")), f"cloud {cli.cloud}"
    path = lab_file(cli.lab_dir)
    try:
        table: Any = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, ""
    return _table(table), str(path)


def _table(found: object) -> dict[str, str]:
    if not isinstance(found, dict):
        return {}
    return {key: value for key in FIELDS if isinstance(value := found.get(key), str) and value}


def complete(cli: CliContext, given: Given) -> tuple[Given, list[str]]:
    """`given` with the defaults filled in where a flag was left out, and the flags taken
    from the defaults (`--flavor m1.tiny`, ...); InvalidArgument names a missing flag."""
    defaults, source = configured(cli)
    picked: list[str] = []

    def take(key: str) -> str:
        picked.append(f"--{key.replace('_', '-')} {defaults[key]}")
        return defaults[key]

    flavor = given.flavor or (take("flavor") if "flavor" in defaults else "")
    if not flavor:
        raise _missing("--flavor", "a flavor (id or name)", source)
    if given.image and given.boot_volume:
        raise errors.InvalidArgument("give --image or --boot-volume, not both", violations=[
            errors.FieldViolation("image", "exactly one of --image, --boot-volume")])
    image = given.image
    if not image and not given.boot_volume:
        if "image" not in defaults:
            raise _missing("--image", "an image (or --boot-volume)", source)
        image = take("image")
    networks = given.networks
    if not networks and not given.ports and "network" in defaults:
        networks = [take("network")]
    groups = given.security_groups
    if not groups and "security_group" in defaults:
        groups = [take("security_group")]
    done = replace(given, flavor=flavor, image=image, networks=networks, security_groups=groups)
    return done, [f"defaults of {source}: {' '.join(picked)}"] if picked else []


def _missing(flag: str, what: str, source: str) -> errors.InvalidArgument:
    where = f"{source} has none" if source else "no cloud defaults are configured"
    return errors.InvalidArgument(
        f"missing {flag}: give {what} ({where})", reason=MISSING,
        violations=[errors.FieldViolation(flag.removeprefix("--"), "required")])
