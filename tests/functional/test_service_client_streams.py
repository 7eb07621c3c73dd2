"""Server streams through the service client: from the catalog, one deadline, no mid-stream retry.

A real echo server is registered in identity's catalog as "echo"; the client
knows only identity's address and the service credential, like a service or
an agent fetching an image from nubis-storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from services.client.peers.rpc import ServerStream, ServiceClient
from services.common import catalog, errors, server
from services.common.settings import ServiceEndpoint
from services.common.store import Store
from tests.functional import echo_service
from tests.functional.service_client_harness import Cloud, CloudFactory, make_cloud
from tests.gen.testing.v1 import echo_pb2

__all__ = ["make_cloud"]

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class EchoClient(ServiceClient):
    NAME = "echo"
    SERVICE = echo_service.SERVICE_NAME

    EchoStream = ServerStream(echo_pb2.EchoRequest, echo_pb2.EchoResponse, timeout=5.0,
                              idempotent=True)


@pytest.fixture
async def echo_cloud(make_cloud: CloudFactory, store: Store) -> AsyncIterator[Cloud]:
    cloud = await make_cloud()
    running = await server.start(ServiceEndpoint(host="127.0.0.1", port=0),
                                 [echo_service.registration()], settings=cloud.settings,
                                 authenticator=echo_service.AnyBearerAuthenticator())
    registered = asyncio.create_task(catalog.keep_registered(
        store, "echo", echo_service.SERVICE_NAME, running.address, ttl=5))
    yield cloud
    registered.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await registered
    await running.stop(0)


async def test_a_stream_yields_every_message(echo_cloud: Cloud) -> None:
    echo = EchoClient(echo_cloud.clients().caller)
    request = echo_pb2.EchoRequest(message="m", repeat=4)
    assert [reply.index async for reply in echo.EchoStream(request)] == [0, 1, 2, 3]


async def test_a_failure_after_the_first_message_is_raised_not_retried(echo_cloud: Cloud) -> None:
    echo = EchoClient(echo_cloud.clients().caller)
    got: list[int] = []
    # UNAVAILABLE after two messages: a retry would send them again.
    with pytest.raises(errors.Unavailable):
        async for reply in echo.EchoStream(echo_pb2.EchoRequest(repeat=2,
                                                                fail_with=UNAVAILABLE)):
            got.append(reply.index)
    assert got == [0, 1]
    with pytest.raises(errors.NotFound):
        async for reply in echo.EchoStream(echo_pb2.EchoRequest(message="x",
                                                                fail_with=NOT_FOUND)):
            assert reply.message == "x"


async def test_the_deadline_covers_the_whole_stream(echo_cloud: Cloud) -> None:
    echo = EchoClient(echo_cloud.clients().caller)
    got: list[int] = []
    started = time.monotonic()
    # Each message alone arrives well within the deadline; all of them do not.
    with pytest.raises(errors.Unavailable):
        async for reply in echo.EchoStream(echo_pb2.EchoRequest(repeat=20, sleep_seconds=0.2),
                                           deadline=1.0):
            got.append(reply.index)
    assert 1.0 <= time.monotonic() - started < 3.0
    assert 2 <= len(got) < 20
