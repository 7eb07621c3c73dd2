"""The configuration a lab hands its processes: a TOML file in the state dir plus `NUBIS_*` env.

The TOML file holds every endpoint of the lab (etcd, Redis, each service), so
a service finds its peers, and names the service credential's password file
(generated once, mode 0600, never printed), so services can call each other;
the environment repeats the essentials (etcd, Redis) so that they win over
anything inherited from the caller's shell.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from services.client.lab import prometheus
from services.client.lab.components import AGENT_CERT, CONTROL_SERVICES, LabPlan
from services.common.settings import TlsSettings

CONFIG_FILE = "nubis.toml"
# The service user's password (services.common.settings.ServiceAuthSettings).
SERVICE_PASSWORD_FILE = "service-password"

# Inherited variables the lab decides itself; a stray one from the caller's
# shell (say NUBIS_IDENTITY__PORT) would point a service at the wrong place.
_LAB_OWNED_PREFIXES = ("NUBIS_CONFIG", "NUBIS_ETCD", "NUBIS_REDIS_URL", "NUBIS_AGENT__NODE_NAME",
                       "NUBIS_SERVICE_AUTH", "NUBIS_TLS")
_SERVICE_PREFIXES = ("IDENTITY", "COMPUTE", "STORAGE", "NETWORK", "SCHEDULER")
# glibc serves an allocation from the heap once a freed mmap'ed one of its size raised the
# mmap threshold, and keeps those pages: identity's argon2 buffer (19 MiB a password hash)
# would stay resident after the first login. A fixed threshold mmaps big blocks always and
# gives them back when freed (measured: identity 91 -> 72 MiB RSS). The caller's value wins.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def lab_settings(plan: LabPlan) -> dict[str, object]:
    """The lab's settings as the nested mapping Settings reads from TOML."""
    ports = plan.ports
    data: dict[str, object] = {
        "redis_url": plan.redis_url(),
        "etcd": {"endpoints": [ports.etcd_endpoint]},
        "service_auth": {"password_file": str(plan.state_dir / SERVICE_PASSWORD_FILE)},
    }
    tls = client_tls(plan.state_dir, plan.tls)
    if tls is not None:
        # The client certificate by default (bootstrap, seeding, the CLI); each service and
        # agent is handed its own in the environment.
        data["tls"] = tls.model_dump(exclude_none=True)
    for name, service in ports.services.items():
        data[name] = {"host": ports.host, "port": service.port,
                      "metrics_port": service.metrics_port,
                      # Image bytes stay with the lab's data (`down --purge` removes them).
                      **({"image_dir": str(plan.data_dir / "images")} if name == "storage"
                         else {})}
    return data


def write_config(plan: LabPlan) -> None:
    """Write the lab's TOML config into the state dir (and the service password, once)."""
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_service_password(plan.state_dir / SERVICE_PASSWORD_FILE)
    if plan.tls:
        _prepare_tls(plan)
    text = "# Written by `nubis lab up`; rewritten on every start.\n" + to_toml(lab_settings(plan))
    # It may carry the Redis password: readable by the lab's owner only.
    descriptor = os.open(plan.config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    prometheus.write(plan)


def _prepare_tls(plan: LabPlan) -> None:
    """The lab's CA and certificates, the Redis password and the redis.conf requiring it."""
    from services.client.lab import pki  # cryptography is loaded only by TLS labs

    pki.ensure(plan.state_dir, plan.ports.host, [*CONTROL_SERVICES, AGENT_CERT])
    ensure_service_password(plan.redis_password_file)
    password = plan.redis_password_file.read_text().strip()
    descriptor = os.open(plan.redis_config_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"requirepass {password}\n")


def client_tls(state_dir: Path, enabled: bool) -> TlsSettings | None:
    """How a client of the lab dials (lab CA, client certificate); None in a plaintext lab."""
    if not enabled:
        return None
    from services.client.lab import pki

    own = pki.paths(state_dir, pki.CLIENT_NAME)
    return TlsSettings(enabled=True, ca_file=str(pki.ca_file(state_dir)), cert_file=str(own.cert),
                       key_file=str(own.key), require_client_cert=True)


def ensure_service_password(path: Path) -> None:
    """Generate the service user's password into `path` (0600) unless it is there already.

    Kept across restarts, so services restarted by `lab up` log in as before.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_urlsafe(24) + "\n")


def child_environment(plan: LabPlan) -> dict[str, str]:
    """Environment of every lab process: the caller's, minus lab-owned NUBIS_* keys, plus ours."""
    env = {**_MALLOC_ENV,
           **{key: value for key, value in os.environ.items() if not _lab_owned(key)}}
    env.update({
        "NUBIS_CONFIG": str(plan.config_file),
        "NUBIS_ETCD__ENDPOINTS": json.dumps([plan.ports.etcd_endpoint]),
        "NUBIS_REDIS_URL": plan.redis_url(),
    })
    return env


def _lab_owned(key: str) -> bool:
    if key.startswith(_LAB_OWNED_PREFIXES):
        return True
    return any(key.startswith(f"NUBIS_{service}__") for service in _SERVICE_PREFIXES)


def to_toml(data: Mapping[str, object]) -> str:
    """Serialise a nested mapping of scalars and lists to TOML (the subset the lab needs)."""
    scalars = [f"{key} = {_value(value)}" for key, value in data.items()
               if not isinstance(value, Mapping)]
    lines = [*scalars]
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{key}]"]
            lines += [f"{k} = {_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        # JSON string escaping is valid TOML basic-string escaping.
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
