"""A small cloud for the service-client tests: identity and scheduler replicas, in-process.

Identity and the schedulers are real servers (their own `main.build`, so they
verify tokens and register in the catalog) on free loopback ports over the
session etcd. The service user exists as `nubis-manage bootstrap` makes it;
`Cloud.clients` gives a process's clients configured with identity's address
and the service credential only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from nubis.scheduler.v1 import scheduler_pb2
from pydantic import SecretStr

from services.client import peers
from services.common.settings import ServiceAuthSettings, ServiceEndpoint, Settings
from services.common.store import Store
from services.identity import bootstrap
from services.identity import main as identity_main
from services.scheduler import main as scheduler_main
from services.scheduler import policy as scheduler_policy
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness
from tests.functional.authz.world import (
    ADMIN_PASSWORD,
    Service,
    service_settings,
    start_service,
    write_key,
)

SERVICE_PASSWORD = "service-password-for-tests"
NODES = ("sc-node-1", "sc-node-2", "sc-node-3")


def metric(service: Service, method: str, code: str) -> float:
    """How many calls of `method` (short name) the server answered with `code`."""
    full = f"/{scheduler_policy.SERVICE}/{method}"
    value = service.running.registry.get_sample_value(
        "nubis_rpc_handled_total", {"method": full, "code": code})
    return value or 0.0


@dataclass
class Cloud:
    """Identity, the schedulers started so far, and the clients handed out."""

    store: Store
    settings: Settings
    identity: Service
    schedulers: list[Service] = field(default_factory=list)
    _clients: list[peers.ServiceClients] = field(default_factory=list)
    _stopped: list[Service] = field(default_factory=list)

    def client_settings(self, **changes: object) -> peers.ClientSettings:
        """What a service process gets: identity's address and the service credential."""
        made = peers.ClientSettings(
            identity_address=self.identity.running.address,
            credential=peers.ServiceCredential("nubis-service", SERVICE_PASSWORD, "service"))
        return dataclasses.replace(made, **changes)  # type: ignore[arg-type]

    def clients(self, **changes: object) -> peers.ServiceClients:
        made = peers.ServiceClients(self.client_settings(**changes))
        self._clients.append(made)
        return made

    async def start_scheduler(self, endpoint: ServiceEndpoint | None = None) -> Service:
        """A scheduler replica as its main builds it: token checks, catalog entry."""
        service = await start_service(scheduler_main.build, self.store, self.settings,
                                      endpoint or ServiceEndpoint(host="127.0.0.1", port=0))
        self.schedulers.append(service)
        return service

    async def stop(self, service: Service) -> None:
        """Stop a replica cleanly (its catalog entry is withdrawn)."""
        await service.stop()
        self._stopped.append(service)

    async def close(self) -> None:
        for clients in self._clients:
            await clients.close()
        for service in self.schedulers:
            if service not in self._stopped:
                await service.stop()
        await self.identity.stop()


CloudFactory = Callable[..., Awaitable[Cloud]]


@pytest.fixture
async def make_cloud(store: Store, etcd: EtcdEndpoint, tmp_path: Path
                     ) -> AsyncIterator[CloudFactory]:
    """Start identity (with `token_ttl`), the service user and three nodes; close at the end."""
    made: list[Cloud] = []

    async def make(token_ttl: int = 3600) -> Cloud:
        key_file = tmp_path / "signing.pem"
        write_key(key_file)
        settings = service_settings(etcd.endpoint, store.root, key_file)
        settings.auth.token_ttl = token_ttl
        settings.service_auth = ServiceAuthSettings(password=SecretStr(SERVICE_PASSWORD))
        await bootstrap.ensure_admin(store, settings.auth, ADMIN_PASSWORD)
        await bootstrap.ensure_service_user(store, settings.auth, settings.service_auth,
                                            SERVICE_PASSWORD)
        for name in NODES:
            await scheduler_harness.put_node(store, scheduler_harness.report(name))
        identity = await start_service(identity_main.build, store, settings,
                                       ServiceEndpoint(host="127.0.0.1", port=0))
        cloud = Cloud(store, settings, identity)
        made.append(cloud)
        return cloud

    yield make
    for cloud in made:
        await cloud.close()


def spec(consumer: str, **fields: object) -> scheduler_pb2.SelectDestinationsRequest:
    small = scheduler_pb2.Resources(vcpus=1, memory_mb=256, disk_gb=1)
    return scheduler_pb2.SelectDestinationsRequest(spec=scheduler_pb2.RequestSpec(
        resources=small, count=1, consumer_ids=[consumer], **fields))  # type: ignore[arg-type]


def code_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code()
