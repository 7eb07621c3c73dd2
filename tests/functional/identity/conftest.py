"""Identity's functional tests share the authorization tests' `world` (one per package),
and may start a second identity replica on the same store (`replica`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nubis.identity.v1 import identity_pb2_grpc

from services.client.channel import make_channel
from services.common.settings import ServiceEndpoint
from services.common.store import Store
from services.identity import main
from tests.functional.authz.conftest import world
from tests.functional.authz.world import World, start_service

__all__ = ["replica", "world"]


@pytest.fixture
async def replica(world: World) -> AsyncIterator[identity_pb2_grpc.IdentityServiceAsyncStub]:
    """A second identity process-alike: its own store connection, verifier and watches."""
    store = await Store.connect(world.settings.etcd.endpoints, root=world.settings.etcd.prefix)
    service = await start_service(main.build, store, world.settings, ServiceEndpoint(port=0))
    channel = make_channel(service.running.address)
    try:
        yield identity_pb2_grpc.IdentityServiceStub(channel)
    finally:
        await channel.close()
        await service.stop()
        await store.close()
