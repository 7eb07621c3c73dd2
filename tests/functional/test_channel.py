"""make_channel's call policy against a real server: default deadlines, retry on UNAVAILABLE."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest

from services.client.channel import CallPolicy, make_channel
from services.common import server
from services.common.settings import ServiceEndpoint, Settings
from tests.functional import echo_service
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc


@pytest.fixture
async def running() -> AsyncIterator[server.RunningServer]:
    started = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=0),
        [echo_service.registration()],
        settings=Settings(),
    )
    yield started
    await started.stop(0)


async def test_unary_calls_get_the_default_deadline(running: server.RunningServer) -> None:
    async with make_channel(running.address, policy=CallPolicy(timeout=0.3)) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(echo_pb2.EchoRequest(sleep_seconds=2))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # An explicit timeout wins over the default.
        assert (await stub.Echo(echo_pb2.EchoRequest(message="m", sleep_seconds=0.5), timeout=5))


async def test_streams_have_no_default_deadline(running: server.RunningServer) -> None:
    async with make_channel(running.address, policy=CallPolicy(timeout=0.3)) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        request = echo_pb2.EchoRequest(repeat=3, sleep_seconds=0.25)
        assert [r.index async for r in stub.EchoStream(request)] == [0, 1, 2]


def _unavailable_count(port: int) -> float:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    prefix = f'nubis_rpc_handled_total{{code="UNAVAILABLE",method="{echo_service.ECHO}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


async def test_unavailable_is_retried(running: server.RunningServer) -> None:
    policy = CallPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.1)
    async with make_channel(running.address, policy=policy) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        # A slow call keeps the server draining (refusing new calls) for a while.
        slow = asyncio.ensure_future(stub.Echo(echo_pb2.EchoRequest(sleep_seconds=1.5)))
        await asyncio.sleep(0.2)
        stopping = asyncio.ensure_future(running.stop(10))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(echo_pb2.EchoRequest(message="refused"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.metrics_port is not None
        assert await asyncio.to_thread(_unavailable_count, running.metrics_port) == 3
        await slow
        await stopping
