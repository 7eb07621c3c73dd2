"""Real node agents for tests: `nubis-agent` subprocesses on the libvirt test driver.

Each test module makes a fixture from `AgentLauncher`; the launcher points
the agents at the session's etcd (under the test's key prefix) and Redis,
and stops every agent it started.
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


def launcher(etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str,
             log_dir: Path) -> Iterator[AgentLauncher]:
    """The body of an agent fixture: a launcher, then every agent it started stopped."""
    agents = AgentLauncher(etcd, redis, key_prefix, log_dir)
    try:
        yield agents
    finally:
        agents.stop_all()
