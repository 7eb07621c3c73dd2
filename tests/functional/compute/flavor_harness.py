"""An in-process nubis-compute on the session etcd and Redis, beside identity's test world.

`running_compute` starts identity with the authorization world's callers
(project A: admin, member, reader; project B: admin; a cloud-admin; a
`service` user) and one compute service that verifies the same tokens. The
flavor and key pair tests need nothing else (no scheduler, storage, network
or agents): those are only called when an instance is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from nubis.compute.v1 import compute_service_pb2_grpc

from services.common.settings import ServiceEndpoint, Settings
from services.common.store import Store
from services.compute import main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.authz.world import (
    Service,
    World,
    running_one_service,
    start_service,
)

SERVICE = "nubis.compute.v1.ComputeService"


@dataclass
class ComputeWorld:
    """Identity's world plus one compute service and a channel to it."""

    world: World
    service: Service
    channel: grpc.aio.Channel

    @property
    def store(self) -> Store:
        return self.world.store

    @property
    def settings(self) -> Settings:
        return self.world.settings

    @property
    def stub(self) -> compute_service_pb2_grpc.ComputeServiceAsyncStub:
        return compute_service_pb2_grpc.ComputeServiceStub(self.channel)

    def as_(self, caller: str) -> tuple[tuple[str, str], ...]:
        """Call metadata of one of the world's callers (a_member, cloud_admin, b_admin...)."""
        return self.world.metadata(caller)


def reason_of(exc: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call ("" if it carries none)."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.reason)
    return ""


async def start_compute(world: World, store: Store | None = None) -> Service:
    """One more compute replica on the world's settings (its own store connection if given)."""
    return await start_service(main.build, store or world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


@contextlib.asynccontextmanager
async def running_compute(etcd_endpoint: str, redis_url: str,
                          directory: Path) -> AsyncIterator[ComputeWorld]:
    """Identity's world and a compute service on a fresh etcd prefix; stopped on exit."""
    async with running_one_service(main.build, SERVICE, "test-compute", etcd_endpoint,
                                   redis_url, directory) as (world, service, channel):
        yield ComputeWorld(world, service, channel)


@pytest.fixture(scope="module")
async def compute(etcd: EtcdEndpoint, redis: RedisEndpoint,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ComputeWorld]:
    """Identity's callers and one compute service, once per module (see `running_compute`)."""
    async with running_compute(etcd.endpoint, redis.url,
                               tmp_path_factory.mktemp("compute")) as built:
        yield built
