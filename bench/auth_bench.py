"""Benchmark of authentication: per-call token check inside a service, and login latency.

Starts a private etcd and an in-process identity service, then measures:
- the auth hook as every service runs it per RPC (bearer parsing, Ed25519 JWT
  verification, revocation lookups, policy table), for a token seen before
  (the common case) and for a never-seen token (full signature check);
- Authenticate over gRPC with the default argon2id cost (slow on purpose).

Run: ``python bench/auth_bench.py [--calls N] [--logins N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import make_channel
from services.client.lab import daemons
from services.common import auth, server
from services.common import logging as nubis_logging
from services.common.settings import AuthSettings, EtcdSettings, ServiceEndpoint, load_settings
from services.common.store import Store
from services.identity import bootstrap, main, policy, user
from services.identity import token as identity_token

PASSWORD = "benchmark admin password"
METHOD = "/nubis.identity.v1.IdentityService/GetProject"


def _report(name: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    print(f"{name:<44} n={len(samples):<6} mean={statistics.fmean(samples):9.1f} µs "
          f"p50={p50:9.1f} µs  p99={p99:9.1f} µs")


async def _hook_cost(authenticator: auth.TokenAuthenticator, tokens: list[str],
                     repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        for token in tokens:
            metadata = {"authorization": f"Bearer {token}"}
            started = time.perf_counter_ns()
            await authenticator.authenticate(METHOD, metadata)
            samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def _fresh_tokens(store: Store, auth_settings: AuthSettings, count: int) -> list[str]:
    """Tokens signed by identity's key without the password hash (to isolate verification)."""
    key = await identity_token.active_key(store, auth_settings)
    admin = await user.find_by_name(store, auth_settings.admin_user)
    assert admin is not None
    return [identity_token.sign(key, admin, admin.default_project_id,
                                 ["admin", "cloud-admin"], 3600).token for _ in range(count)]


async def _logins(address: str, auth_settings: AuthSettings, count: int) -> list[float]:
    channel = make_channel(address)
    stub = identity_pb2_grpc.IdentityServiceStub(channel)
    request = identity_pb2.AuthenticateRequest(username=auth_settings.admin_user,
                                               password=PASSWORD,
                                               project=auth_settings.admin_project)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter_ns()
            await stub.Authenticate(request)
            samples.append((time.perf_counter_ns() - started) / 1000)
    finally:
        await channel.close()
    return samples


async def run(etcd_endpoint: str, calls: int, logins: int) -> None:
    settings = load_settings(etcd=EtcdSettings(endpoints=[etcd_endpoint], prefix="/bench"),
                             identity=ServiceEndpoint(port=0))
    nubis_logging.configure_logging(load_settings(log_level="warning"))
    store = await Store.connect([etcd_endpoint], root="/bench")
    await bootstrap.ensure_admin(store, settings.auth, PASSWORD)
    parts = await main.build(store, settings)
    for job in parts.background:
        if asyncio.iscoroutine(job):
            job.close()  # no catalog entry for a benchmark (factories never start)
    running = await server.start(settings.identity, parts.registrations, settings=settings,
                                 authenticator=parts.authenticator,
                                 public_methods=parts.public_methods)
    verifier = auth.TokenVerifier(store)
    await verifier.start()
    hook = auth.TokenAuthenticator(verifier, policy.TABLE)
    try:
        warm = await _fresh_tokens(store, settings.auth, 10)
        await _hook_cost(hook, warm, 1)
        _report("auth hook, known token (verify+policy)", await _hook_cost(hook, warm,
                                                                           calls // 10))
        cold = await _fresh_tokens(store, settings.auth, min(calls, 5000))
        _report("auth hook, first sight (Ed25519 verify)", await _hook_cost(hook, cold, 1))
        hasher = settings.auth
        print(f"argon2id cost: t={hasher.hash_time_cost} m={hasher.hash_memory_kib} KiB "
              f"p={hasher.hash_parallelism}")
        _report("Authenticate over gRPC (argon2id)", await _logins(running.address,
                                                                   settings.auth, logins))
    finally:
        await verifier.stop()
        await running.stop(0)
        for callback in parts.on_stop:
            await callback()
        await store.close()


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--logins", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        port, peer = daemons.free_port(), daemons.free_port()
        etcd = daemons.start_etcd(Path(scratch) / "etcd", port, peer)
        try:
            asyncio.run(run(f"127.0.0.1:{port}", args.calls, args.logins))
        finally:
            etcd.stop()


if __name__ == "__main__":
    main_cli()
