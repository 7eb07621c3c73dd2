"""The gRPC server bootstrap, end to end: real servers on port 0, real channels from make_channel.

Health and draining, reflection, domain errors to status with google.rpc
details, undecodable requests, request ids, the auth hook and the request
context (unary and streaming), and the /metrics endpoint.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from services.client.channel import CallPolicy, make_channel
from services.common import server
from services.common.server.interceptors import Authenticator
from services.common.settings import ServiceEndpoint, Settings
from tests.functional import echo_service
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc

Serve = Callable[..., Awaitable[server.RunningServer]]
Echo = tuple[server.RunningServer, grpc.aio.Channel]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start Echo servers (stopped at the end of the test)."""
    started: list[server.RunningServer] = []

    async def _serve(
        authenticator: Authenticator | None = None,
        public_methods: frozenset[str] = frozenset(),
    ) -> server.RunningServer:
        running = await server.start(
            ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=0),
            [echo_service.registration()],
            settings=Settings(),
            authenticator=authenticator,
            public_methods=public_methods,
        )
        started.append(running)
        return running

    yield _serve
    for running in started:
        await running.stop(0)


@pytest.fixture
async def echo(serve: Serve) -> AsyncIterator[Echo]:
    """An Echo server without authentication, and a channel to it."""
    running = await serve()
    async with make_channel(running.address) as channel:
        yield running, channel


def _rich(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    rich = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert rich is not None, "no google.rpc.Status in the trailers"
    return rich


def _error_info(rich: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    for detail in rich.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            message = error_details_pb2.ErrorInfo()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no ErrorInfo in {rich}")


def _bad_request(rich: status_pb2.Status) -> error_details_pb2.BadRequest:
    for detail in rich.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            message = error_details_pb2.BadRequest()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no BadRequest in {rich}")


async def _echo_error(channel: grpc.aio.Channel, **fields: object) -> grpc.aio.AioRpcError:
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Echo(echo_pb2.EchoRequest(**fields))  # type: ignore[arg-type]
    return caught.value


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_health_serving_after_start(echo: Echo) -> None:
    running, channel = echo
    assert running.port > 0
    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, echo_service.SERVICE_NAME) == serving


async def test_draining_reports_not_serving_and_lets_calls_finish(serve: Serve) -> None:
    running = await serve()
    # No retries: the refusal during the drain is what this test looks at.
    async with make_channel(running.address, policy=CallPolicy(max_attempts=1)) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        slow_request = echo_pb2.EchoRequest(message="slow", sleep_seconds=1.5)
        slow = asyncio.ensure_future(stub.Echo(slow_request))
        await asyncio.sleep(0.3)
        stopping = asyncio.ensure_future(running.stop(10))
        await asyncio.sleep(0.2)

        assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(channel, echo_service.SERVICE_NAME) == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        refused = await _echo_error(channel, message="late")
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert _error_info(_rich(refused)).reason == (
            "nubis.server.shutting_down"
        )
        assert not stopping.done()

        assert (await slow).message == "slow"
        # The drain ends with the last call, not at the end of the grace.
        await asyncio.wait_for(stopping, 3)


async def test_reflection_lists_services(echo: Echo) -> None:
    _, channel = echo
    info = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for response in info(iter([request])):
        names |= {s.name for s in response.list_services_response.service}
    assert {echo_service.SERVICE_NAME, "grpc.health.v1.Health"} <= names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_not_found_carries_error_info(echo: Echo) -> None:
    _, channel = echo
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    error = await _echo_error(channel, message="ghost", fail_with=not_found)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "echo 'ghost' not found"
    info = _error_info(_rich(error))
    assert (info.reason, info.domain) == ("nubis.not_found", "nubis")
    assert dict(info.metadata) == {"message": "ghost"}


async def test_invalid_argument_carries_field_violations(
    echo: Echo,
) -> None:
    _, channel = echo
    error = await _echo_error(channel, fail_with=grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    rich = _rich(error)
    violations = [(v.field, v.description) for v in _bad_request(rich).field_violations]
    assert violations == [("message", "must not be shouted"), ("repeat", "must be small")]
    assert _error_info(rich).reason == "nubis.invalid_argument"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.ALREADY_EXISTS, "nubis.already_exists"),
        (grpc.StatusCode.ABORTED, "nubis.conflict"),
        (grpc.StatusCode.FAILED_PRECONDITION, "nubis.failed_precondition"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "nubis.quota.exceeded"),
        (grpc.StatusCode.PERMISSION_DENIED, "nubis.permission_denied"),
        (grpc.StatusCode.UNAUTHENTICATED, "nubis.unauthenticated"),
    ],
)
async def test_every_domain_error_has_its_code(
    echo: Echo, code: grpc.StatusCode, reason: str
) -> None:
    _, channel = echo
    error = await _echo_error(channel, message="x", fail_with=code.value[0])
    assert error.code() == code
    assert _error_info(_rich(error)).reason == reason


async def test_unexpected_exception_is_internal_without_its_text(
    echo: Echo,
) -> None:
    _, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    call = stub.Echo(
        echo_pb2.EchoRequest(message="hunter2", fail_with=grpc.StatusCode.INTERNAL.value[0]),
        metadata=(("x-request-id", "req-bug-1"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    error = caught.value
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id req-bug-1)"
    for leaked in ("hunter2", "password", "RuntimeError", "Traceback"):
        assert leaked not in str(error.details()) + str(error.debug_error_string())


async def test_unwritten_method_is_unimplemented(echo: Echo) -> None:
    _, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Unimplemented(echo_pb2.EchoRequest())
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert _error_info(_rich(caught.value)).reason == "nubis.unimplemented"


async def test_undecodable_request_is_invalid_argument(
    echo: Echo,
) -> None:
    _, channel = echo
    garbage = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # field 1 (a string) holding invalid UTF-8

    def raw(data: bytes) -> bytes:
        return data

    unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
    unary = channel.unary_unary(echo_service.ECHO, request_serializer=raw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(garbage)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = _error_info(_rich(caught.value)).reason
    assert reason == "nubis.request.undecodable"

    streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
    streaming = channel.unary_stream(echo_service.ECHO_STREAM, request_serializer=raw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in streaming(b"\xff\xff\xff"):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_request_id_is_echoed(echo: Echo) -> None:
    _, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    call = stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=(("x-request-id", "req-42"),))
    response = await call
    assert response.request_id == "req-42"
    assert ("x-request-id", "req-42") in tuple(await call.trailing_metadata() or ())


async def test_request_id_is_generated_when_absent_or_unusable(
    echo: Echo,
) -> None:
    running, _ = echo
    # A bare channel: make_channel would add a request id of its own.
    async with grpc.aio.insecure_channel(running.address) as bare:
        stub = echo_pb2_grpc.EchoServiceStub(bare)
        unusable = ["spaces and \"quotes\" {}", "x" * 200]
        for metadata in [(), *((("x-request-id", sent),) for sent in unusable)]:
            call = stub.Echo(echo_pb2.EchoRequest(message="hi"), metadata=metadata)
            response = await call
            trailing = dict(tuple(await call.trailing_metadata() or ()))
            assert response.request_id.startswith("req-")
            assert trailing["x-request-id"] == response.request_id


async def test_make_channel_sends_a_request_id(
    echo: Echo,
) -> None:
    _, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    first = await stub.Echo(echo_pb2.EchoRequest())
    second = await stub.Echo(echo_pb2.EchoRequest())
    assert first.request_id.startswith("req-") and first.request_id != second.request_id


async def test_authenticator_rejects_unknown_callers(serve: Serve) -> None:
    authenticator = echo_service.TokenAuthenticator({"good": echo_service.principal("alice")})
    running = await serve(authenticator=authenticator)
    for token in (None, "forged"):
        async with make_channel(running.address, token=token) as channel:
            error = await _echo_error(channel, message="hi")
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            info = _error_info(_rich(error))
            assert info.reason == "nubis.unauthenticated"
    # Health is never authenticated, and not offered to the authenticator.
    async with make_channel(running.address) as channel:
        assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert authenticator.seen == [echo_service.ECHO, echo_service.ECHO]


async def test_principal_is_the_request_context(serve: Serve) -> None:
    authenticator = echo_service.TokenAuthenticator({"good": echo_service.principal("alice")})
    running = await serve(authenticator=authenticator)
    async with make_channel(running.address, token="good") as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        assert (await stub.Echo(echo_pb2.EchoRequest(message="hi"))).user_id == "alice"
        streamed = [r async for r in stub.EchoStream(echo_pb2.EchoRequest(repeat=3))]
    assert [(r.index, r.user_id) for r in streamed] == [(0, "alice"), (1, "alice"), (2, "alice")]
    assert len({r.request_id for r in streamed}) == 1


async def test_public_methods_skip_the_authenticator(serve: Serve) -> None:
    authenticator = echo_service.TokenAuthenticator({})
    running = await serve(
        authenticator=authenticator, public_methods=frozenset({echo_service.ECHO})
    )
    async with make_channel(running.address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        response = await stub.Echo(echo_pb2.EchoRequest(message="open"))
        assert (response.message, response.user_id) == ("open", "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.EchoStream(echo_pb2.EchoRequest(message="closed")):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert authenticator.seen == [echo_service.ECHO_STREAM]


async def test_stream_failing_midway_reports_the_domain_error(
    echo: Echo,
) -> None:
    _, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    received: list[int] = []
    not_found = grpc.StatusCode.NOT_FOUND.value[0]
    request = echo_pb2.EchoRequest(message="m", repeat=2, fail_with=not_found)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in stub.EchoStream(request):
            received.append(response.index)
    assert received == [0, 1]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert _error_info(_rich(caught.value)).reason == "nubis.not_found"


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_metrics_count_calls_by_method_and_code(
    echo: Echo,
) -> None:
    running, channel = echo
    stub = echo_pb2_grpc.EchoServiceStub(channel)
    for _ in range(3):
        await stub.Echo(echo_pb2.EchoRequest(message="count me"))
    await _echo_error(channel, fail_with=grpc.StatusCode.NOT_FOUND.value[0])
    assert running.metrics_port is not None
    text = await asyncio.to_thread(_scrape, running.metrics_port)
    ok = f'nubis_rpc_handled_total{{code="OK",method="{echo_service.ECHO}"}} 3.0'
    not_found = f'nubis_rpc_handled_total{{code="NOT_FOUND",method="{echo_service.ECHO}"}} 1.0'
    assert ok in text and not_found in text
    assert f'nubis_rpc_duration_seconds_count{{method="{echo_service.ECHO}"}} 4.0' in text
