"""docker-compose.yml end to end: build the images, bring the cloud up, boot a server from the host.

Builds the Debian base image (deploy/make-base-image.sh, kept between runs) and nubis's
image, runs `docker-compose up -d` under a project name and host ports of its own, waits
until every container with a health check is healthy, then drives the cloud with the
`nubis` CLI on the host: log in as the bootstrap admin, upload an image, make a network,
boot `demo` on m1.tiny to ACTIVE and delete it. `docker-compose down -v` runs whatever
happens. When no Docker daemon answers, the test starts `dockerd` itself and stops it
(by its PID) at the end. Timings are printed (pytest -s, or the -ra summary on failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.lab import daemons, seed
from tests.e2e.lab_cli import run_cli

pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
HEALTH_TIMEOUT = 240.0
# The published services and the variables docker-compose.yml takes their host ports from.
PUBLISHED = {"identity": "NUBIS_IDENTITY_PORT", "compute": "NUBIS_COMPUTE_PORT",
             "storage": "NUBIS_STORAGE_PORT", "network": "NUBIS_NETWORK_PORT",
             "scheduler": "NUBIS_SCHEDULER_PORT"}


def _need(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (scripts/setup.sh installs it)")


def _docker_answers() -> bool:
    done = subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Docker daemon: the running one, else a `dockerd` started (and stopped) here."""
    for binary in ("docker", "docker-compose", "debootstrap"):
        _need(binary)
    if _docker_answers():
        yield
        return
    _need("dockerd")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    daemon = daemons.spawn("dockerd", ["dockerd"], log)
    try:
        deadline = time.monotonic() + 60
        while not _docker_answers():
            assert daemon.alive(), log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "dockerd did not answer within 60s"
            time.sleep(0.5)
        yield
    finally:
        daemon.stop(timeout=30)


@pytest.fixture(scope="module")
def nubis_image(docker_daemon: None) -> Iterator[str]:
    """nubis's image, built (with the base image when missing) by deploy/build-image.sh."""
    image = f"nubis:test-{os.getpid()}"
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "deploy" / "build-image.sh")], cwd=REPO,
                          env={**os.environ, "NUBIS_IMAGE": image}, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    print(f"\nimage build: {time.monotonic() - started:.1f}s")
    yield image
    subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, check=False)


class Compose:
    """One docker-compose project of docker-compose.yml, with its own name and host ports."""

    def __init__(self, image: str) -> None:
        self.project = f"nubistest{os.getpid()}"
        ports = daemons.free_ports(len(PUBLISHED))
        self.ports = dict(zip(PUBLISHED, ports, strict=True))
        self.admin_password = secrets.token_urlsafe(12)
        self.env = {**os.environ, "NUBIS_IMAGE": image, "COMPOSE_PROJECT_NAME": self.project,
                    "NUBIS_ADMIN_PASSWORD": self.admin_password,
                    **{var: str(self.ports[name]) for name, var in PUBLISHED.items()}}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def health(self) -> dict[str, str]:
        """Each container's health status ("none" without a health check)."""
        ids = self.run("ps", "-q").stdout.split()
        if not ids:
            return {}
        done = subprocess.run(
            ["docker", "inspect", "--format",
             "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
             "{{else}}none{{end}}", *ids], capture_output=True, text=True, check=False)
        rows = (line.split() for line in done.stdout.splitlines())
        return {name.lstrip("/"): f"{state}/{health}" for name, state, health in rows}

    def cli_env(self, home: Path) -> dict[str, str]:
        """What the host's `nubis` needs to use this cloud (README: docker-compose)."""
        env = {"NUBIS_LAB_DIR": str(home / "no-lab"), "XDG_CONFIG_HOME": str(home)}
        for name, port in self.ports.items():
            env[f"NUBIS_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        return env


def _wait_healthy(compose: Compose) -> float:
    started = time.monotonic()
    deadline = started + HEALTH_TIMEOUT
    while True:
        states = compose.health()
        waiting = {n: s for n, s in states.items() if not s.endswith(("/healthy", "/none"))
                   and not s.startswith("exited/none")}
        if states and not waiting:
            return time.monotonic() - started
        assert time.monotonic() < deadline, f"not healthy after {HEALTH_TIMEOUT}s: {waiting}"
        time.sleep(1)


@pytest.fixture
def cloud(nubis_image: str) -> Iterator[Compose]:
    compose = Compose(nubis_image)
    try:
        started = time.monotonic()
        up = compose.run("up", "-d", "--no-build")
        assert up.returncode == 0, up.stderr[-4000:]
        waited = _wait_healthy(compose)
        print(f"\ncompose up -> healthy: {time.monotonic() - started:.1f}s "
              f"(up -d returned, then {waited:.1f}s)")
        yield compose
    except BaseException:
        print(compose.run("logs", "--no-color", "--tail", "40").stdout[-8000:])
        raise
    finally:
        started = time.monotonic()
        with contextlib.suppress(subprocess.SubprocessError):
            compose.run("down", "-v", "--remove-orphans", timeout=180)
        print(f"\ncompose down -v: {time.monotonic() - started:.1f}s")


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = run_cli(*args, env=env, timeout=timeout)
    assert done.returncode == 0, f"nubis {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _wait_nodes_up(env: dict[str, str], count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        rows = json.loads(_cli(env, "-o", "json", "node", "list"))
        if sum(1 for row in rows if str(row.get("state", "")).upper() == "UP") >= count:
            return
        assert time.monotonic() < deadline, f"nodes not UP: {rows}"
        time.sleep(1)


def test_compose_cloud_boots_a_server_from_the_host_cli(cloud: Compose, tmp_path: Path) -> None:
    started = time.monotonic()
    env = cloud.cli_env(tmp_path)
    _cli(env, "login", "-u", "admin", "--password", cloud.admin_password)
    rows = json.loads(_cli(env, "-o", "json", "catalog", "list"))
    compute = [row for row in rows if row.get("name") == "compute"]
    assert len(compute) == 2, rows
    _wait_nodes_up(env, 2)
    disk = seed.make_image(tmp_path / "hello.qcow2")
    _cli(env, "image", "create", "hello", "--file", str(disk))
    _cli(env, "network", "create", "demo-net")
    _cli(env, "subnet", "create", "demo-subnet", "--network", "demo-net",
         "--cidr", "10.0.0.0/24")
    _cli(env, "server", "create", "demo", "--flavor", "m1.tiny", "--image", "hello",
         "--network", "demo-net", "--wait", timeout=240)
    shown = json.loads(_cli(env, "-o", "json", "server", "show", "demo"))
    assert shown["state"] == "ACTIVE", shown
    _cli(env, "server", "delete", "demo", "--wait", timeout=180)
    left = json.loads(_cli(env, "-o", "json", "server", "list"))
    assert all(row.get("name") != "demo" for row in left), left
    print(f"\nCLI session (login .. server delete): {time.monotonic() - started:.1f}s")
