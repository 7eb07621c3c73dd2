"""nubis-compute, nubis-storage and nubis-network start as real processes against etcd.

Each main serves its API (every RPC still the generated UNIMPLEMENTED base),
answers health and reflection, refuses calls without a valid token, registers
itself in the catalog, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from nubis.compute.v1 import compute_service_pb2_grpc, flavor_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import network_pb2, network_service_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc

from services.client.channel import make_channel
from services.client.lab import daemons
from services.common import catalog
from services.common.store import Store
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import serving

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["compute", "storage", "network"]
# Well formed (header.payload.signature) but signed by nobody nubis knows.
FORGED = "eyJhbGciOiJFZERTQSIsImtpZCI6Im5vbmUifQ.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl"


def _text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _reflected_services(address: str) -> list[str]:
    async with make_channel(address) as channel:
        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for response in call:
            return [service.name for service in response.list_services_response.service]
    return []


async def _call_one(service: str, address: str, token: str | None) -> None:
    """One ordinary List call of the service's API."""
    async with make_channel(address, token=token) as channel:
        if service == "compute":
            await compute_service_pb2_grpc.ComputeServiceStub(channel).ListFlavors(
                flavor_pb2.ListFlavorsRequest()
            )
        elif service == "storage":
            await storage_service_pb2_grpc.StorageServiceStub(channel).ListImages(
                image_pb2.ListImagesRequest()
            )
        else:
            await network_service_pb2_grpc.NetworkServiceStub(channel).ListNetworks(
                network_pb2.ListNetworksRequest()
            )


async def _registered(store: Store, service: str) -> list[str]:
    """Catalog entries of `service`, waiting a little: registration follows SERVING."""
    deadline = time.monotonic() + 5
    while True:
        entries, _ = await store.list_all(catalog.endpoint_prefix(service), identity_pb2.Endpoint)
        if entries or time.monotonic() > deadline:
            return [entry.value.service for entry in entries]
        await asyncio.sleep(0.1)


@pytest.fixture
async def etcd_view(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[Store]:
    """A store on the same root the service process uses."""
    store = await Store.connect([etcd.endpoint], root=key_prefix)
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_main_serves_and_stops(
    service: str, etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str, etcd_view: Store,
    tmp_path: Path,
) -> None:
    port = daemons.free_port()
    upper = service.upper()
    env = {
        **os.environ,
        "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd.endpoint]),
        "NUBIS_ETCD__PREFIX": key_prefix,
        "NUBIS_REDIS_URL": redis.url,
        f"NUBIS_{upper}__PORT": str(port),
        f"NUBIS_{upper}__METRICS_PORT": "0",
        "NUBIS_SHUTDOWN_GRACE": "1",
        # Storage makes its image directory at start: keep it in the test's own.
        "NUBIS_STORAGE__IMAGE_DIR": str(tmp_path / "images"),
    }
    log = tmp_path / f"{service}.log"
    daemon = daemons.spawn(
        service, [sys.executable, "-m", f"services.{service}.main"], log, env=env, cwd=REPO_ROOT
    )
    address = f"127.0.0.1:{port}"
    try:
        await serving.wait_serving(address, daemon.proc, lambda: _text(log))
        full_name = f"nubis.{service}.v1.{service.capitalize()}Service"
        assert full_name in await _reflected_services(address)

        for token in (None, FORGED):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call_one(service, address, token)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        assert await _registered(etcd_view, service) == [full_name]

        daemon.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.proc.wait, 10) == 0, _text(log)
    finally:
        daemon.stop()
