"""`nubis lab up --tls`: every gRPC hop with mutual TLS through the lab's CA, Redis with AUTH."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import nubis
import pytest
import redis
import redis.exceptions
from nubis.compute.v1 import flavor_pb2

from services.client.lab import components, config, daemons, health, pki, state
from services.common.settings import TlsSettings
from tests.e2e.lab_cli import HEALTHY, recorded_pids, run_cli, status_rows


def _probe(address: str, tls: TlsSettings | None) -> str:
    return asyncio.run(health.grpc_health(address, probe_seconds=3.0, tls=tls))


def _foreign_client(tmp: Path) -> TlsSettings:
    """A client whose CA and certificate come from another PKI than the lab's."""
    pki.ensure(tmp, "127.0.0.1", [])
    own = pki.paths(tmp, pki.CLIENT_NAME)
    return TlsSettings(enabled=True, ca_file=str(pki.ca_file(tmp)), cert_file=str(own.cert),
                       key_file=str(own.key))


def _check_files(lab_dir: Path) -> None:
    for key in [*lab_dir.glob("tls/*.key"), lab_dir / "redis-password", lab_dir / "nubis.toml"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    cli_tls = config.client_tls(lab_dir, True)
    assert cli_tls is not None and cli_tls.ca_file == str(lab_dir / "tls" / "ca.pem")


def _check_grpc(lab_dir: Path, tmp: Path) -> None:
    lab = state.load(lab_dir)
    assert lab is not None and lab.tls
    lab_tls = config.client_tls(lab_dir, True)
    assert lab_tls is not None
    no_cert = lab_tls.model_copy(update={"cert_file": None, "key_file": None})
    foreign = _foreign_client(tmp / "foreign")
    services = [p for p in lab.processes if p.readiness == components.Readiness.GRPC.value]
    assert {p.name for p in services} >= {f"nubis-{s}" for s in components.CONTROL_SERVICES}
    for record in services:
        address = f"{lab.host}:{record.port}"
        assert _probe(address, lab_tls) == health.SERVING, record.name
        # Also by name: localhost is in every server certificate.
        assert _probe(f"localhost:{record.port}", lab_tls) == health.SERVING, record.name
        assert _probe(address, None) == health.UNREACHABLE, f"{record.name} took plaintext"
        assert _probe(address, foreign) == health.UNREACHABLE, f"{record.name}: foreign CA"
        assert _probe(address, no_cert) == health.UNREACHABLE, f"{record.name}: no client cert"


def _check_redis(lab_dir: Path) -> None:
    lab = state.load(lab_dir)
    assert lab is not None
    port = next(p.port for p in lab.processes if p.name == "redis")
    assert port is not None
    with redis.Redis(host=lab.host, port=port, socket_timeout=3) as anonymous, \
            pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    password = (lab_dir / "redis-password").read_text().strip()
    with redis.Redis(host=lab.host, port=port, password=password, socket_timeout=3) as client:
        assert client.ping()
    # Every Celery client of the lab is handed the password, and redis-server's argv is not.
    assert f":{password}@" in (lab_dir / "nubis.toml").read_text()
    assert all(password not in " ".join(p.argv) for p in lab.processes)


def _check_cli(lab_dir: Path) -> None:
    env = {"NUBIS_LAB_DIR": str(lab_dir)}
    nodes = run_cli("-o", "json", "node", "list", env=env)
    assert nodes.returncode == 0, nodes.stdout + nodes.stderr
    assert [n["name"] for n in json.loads(nodes.stdout)] == ["node-1"]
    flavors = run_cli("-o", "json", "flavor", "list", env=env)
    assert flavors.returncode == 0, flavors.stdout + flavors.stderr
    assert "m1.tiny" in {f["name"] for f in json.loads(flavors.stdout)}
    # A boot crosses every hop: CLI -> compute -> scheduler/storage/network, the agent's
    # Celery task through the password-protected Redis, its image fetch from storage.
    boot = run_cli("-o", "json", "server", "create", "tls-demo", "--flavor", "m1.tiny",
                   "--image", "lab-hello", "--network", "private", "--wait", env=env)
    assert boot.returncode == 0, boot.stdout + boot.stderr
    assert "ACTIVE" in boot.stdout
    gone = run_cli("server", "delete", "tls-demo", "--wait", env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr


def _check_sdk(lab_dir: Path) -> None:
    """The SDK finds the lab's CA and client certificate as the CLI does."""
    async def go() -> list[str]:
        async with nubis.connect(lab_dir=lab_dir) as cloud:
            reply = await cloud.compute.ListFlavors(flavor_pb2.ListFlavorsRequest())
            return [flavor.meta.name for flavor in reply.flavors]

    assert "m1.tiny" in asyncio.run(go())


def _no_log_shows_the_password(lab_dir: Path) -> None:
    password = (lab_dir / "redis-password").read_text().strip()
    for log in (lab_dir / "logs").glob("*.log"):
        assert password not in log.read_text(errors="replace"), log


def _restart_keeps_the_pki(lab_dir: Path, base_port: int, pids: dict[str, int]) -> None:
    """A dead service is started again with the same CA (the others keep trusting it)."""
    ca = (lab_dir / "tls" / "ca.pem").read_bytes()
    daemons.stop_pid(pids["nubis-scheduler"], timeout=5)
    again = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nubis-scheduler" in again.stdout
    assert (lab_dir / "tls" / "ca.pem").read_bytes() == ca
    lab_tls = config.client_tls(lab_dir, True)
    address = f"127.0.0.1:{base_port + 4}"
    assert _probe(address, lab_tls) == health.SERVING
    assert _probe(address, None) == health.UNREACHABLE
    pids.update(recorded_pids(lab_dir))


def test_tls_lab_refuses_plaintext_foreign_ca_and_redis_without_password(
        lab_dir: Path, base_port: int, tmp_path: Path) -> None:
    up = run_cli("lab", "up", "--tls", "--nodes", "1", "--state-dir", str(lab_dir),
                 "--base-port", str(base_port))
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"lab CA {lab_dir / 'tls' / 'ca.pem'}" in " ".join(up.stdout.split())
    pids = recorded_pids(lab_dir)
    rows = status_rows(lab_dir)  # the lab's own probes go through the CA too
    assert all(row["alive"] and row["health"] in HEALTHY for row in rows), rows

    _check_files(lab_dir)
    _check_grpc(lab_dir, tmp_path)
    _check_redis(lab_dir)
    _check_cli(lab_dir)
    _check_sdk(lab_dir)
    _no_log_shows_the_password(lab_dir)
    _restart_keeps_the_pki(lab_dir, base_port, pids)

    down = run_cli("lab", "down", "--state-dir", str(lab_dir), "--purge")
    assert down.returncode == 0, down.stdout + down.stderr
    for name, pid in pids.items():
        assert not daemons.pid_alive(pid), f"{name} (pid {pid}) still runs"
    assert not (lab_dir / "tls").exists() and not (lab_dir / "redis-password").exists()


def test_tls_up_on_a_plaintext_lab_says_to_take_it_down_first(tmp_path: Path) -> None:
    lab_dir = tmp_path / "plain"
    sleeper = daemons.spawn("sleeper", ["sleep", "30"], lab_dir / "logs" / "sleeper.log")
    try:
        lab = state.LabState(state_dir=str(lab_dir), host="127.0.0.1", created=0.0, nodes=0)
        lab.processes.append(state.record("sleeper", sleeper, readiness="alive", wave=0,
                                          port=None, ports={}))
        state.save(lab, lab_dir)
        up = run_cli("lab", "up", "--tls", "--state-dir", str(lab_dir))
        assert up.returncode != 0
        assert "runs without TLS" in up.stderr and "Traceback" not in up.stderr, up.stderr
        assert sleeper.alive()  # nothing of the running lab is touched
    finally:
        sleeper.stop(timeout=2)
