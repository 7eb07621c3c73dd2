"""Real node agents for tests: `nubis-agent` subprocesses on the libvirt test driver.

Each test module makes a fixture from `AgentLauncher`; the launcher points
the agents at the session's etcd (under the test's key prefix) and Redis,
and stops every agent it started. Agents that call services (a fetch of an
image from nubis-storage) are given identity's address and the service
credential with `service_credential_env`; `storage_env` gives an agent its
own pool and image cache directories.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from services.client.lab import daemons
from tests.conftest import EtcdEndpoint, RedisEndpoint

LEASE_TTL = 4
"""Node lease TTL of test agents: short, so a killed agent's node goes DOWN quickly."""


class AgentLauncher:
    """Starts agents named by the test; `stop_all` ends each by its PID."""

    def __init__(self, etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str,
                 log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self._log_dir = log_dir
        self.key_prefix = key_prefix
        """The etcd prefix the agents publish their nodes under."""
        self.etcd_endpoint = etcd.endpoint
        self._env = dict(os.environ)
        self._env.update({
            "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd.endpoint]),
            "NUBIS_ETCD__PREFIX": key_prefix,
            "NUBIS_REDIS_URL": redis.url,
            "NUBIS_AGENT__LEASE_TTL": str(LEASE_TTL),
            "NUBIS_AGENT__TRAITS": json.dumps(["CUSTOM_LAB"]),
            "NUBIS_LOG_JSON": "false",
        })
        self._env.update(env or {})
        self.started: list[daemons.Daemon] = []

    def start(self, name: str, env: Mapping[str, str] | None = None) -> daemons.Daemon:
        """Start the agent of node `name` (with `env` over the launcher's environment)."""
        argv = [sys.executable, "-m", "services.agent.main", "--node-name", name]
        daemon = daemons.spawn(f"agent-{name}", argv,
                               self._log_dir / f"{name}-{len(self.started)}.log",
                               env={**self._env, **(env or {})})
        self.started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


def service_credential_env(identity_address: str, password_file: Path,
                           user: str = "nubis-service", project: str = "service",
                           ) -> dict[str, str]:
    """What an agent needs to call services: where identity is and the service user's
    password file (as the lab's config names it)."""
    host, _, port = identity_address.rpartition(":")
    return {
        "NUBIS_IDENTITY__HOST": host,
        "NUBIS_IDENTITY__PORT": port,
        "NUBIS_SERVICE_AUTH__USER": user,
        "NUBIS_SERVICE_AUTH__PROJECT": project,
        "NUBIS_SERVICE_AUTH__PASSWORD_FILE": str(password_file),
    }


def storage_env(directory: Path, pool: str = "nubis") -> dict[str, str]:
    """An agent's own storage pool (`directory`/pool) and image cache (`directory`/cache)."""
    return {
        "NUBIS_AGENT__STORAGE_POOL": pool,
        "NUBIS_AGENT__STORAGE_POOL_PATH": str(directory / "pool"),
        "NUBIS_AGENT__IMAGE_CACHE_PATH": str(directory / "cache"),
    }


def launcher(etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str,
             log_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[AgentLauncher]:
    """The body of an agent fixture: a launcher, then every agent it started stopped."""
    agents = AgentLauncher(etcd, redis, key_prefix, log_dir, env)
    try:
        yield agents
    finally:
        agents.stop_all()
