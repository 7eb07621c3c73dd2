"""The test-only EchoService servicer and authenticators that exercise the server bootstrap.

The servicer raises the domain error a request asks for (`fail_with`, a gRPC
code number) so tests can watch the mapping to status codes end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
import structlog

from services.common import context, errors
from services.common.server import Registration
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc

SERVICE_NAME = "nubis.testing.v1.EchoService"
ECHO = f"/{SERVICE_NAME}/Echo"
ECHO_STREAM = f"/{SERVICE_NAME}/EchoStream"

_log = structlog.get_logger("tests.echo")

_FAILURES: dict[int, Callable[[str], Exception]] = {
    grpc.StatusCode.NOT_FOUND.value[0]: lambda m: errors.NotFound(
        f"echo {m!r} not found", metadata={"message": m}
    ),
    grpc.StatusCode.ALREADY_EXISTS.value[0]: lambda m: errors.AlreadyExists(m),
    grpc.StatusCode.ABORTED.value[0]: lambda m: errors.Conflict(m),
    grpc.StatusCode.INVALID_ARGUMENT.value[0]: lambda m: errors.InvalidArgument(
        "invalid echo",
        violations=[
            errors.FieldViolation("message", "must not be shouted"),
            errors.FieldViolation("repeat", "must be small"),
        ],
    ),
    grpc.StatusCode.FAILED_PRECONDITION.value[0]: lambda m: errors.FailedPrecondition(m),
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: lambda m: errors.ResourceExhausted(
        m, reason="nubis.quota.exceeded"
    ),
    grpc.StatusCode.PERMISSION_DENIED.value[0]: lambda m: errors.PermissionDenied(m),
    grpc.StatusCode.UNAUTHENTICATED.value[0]: lambda m: errors.Unauthenticated(m),
    grpc.StatusCode.UNAVAILABLE.value[0]: lambda m: errors.Unavailable(m),
    # Not a domain error: a bug, whose text must never reach the client.
    grpc.StatusCode.INTERNAL.value[0]: lambda m: RuntimeError(f"database password leaked: {m}"),
}


def _fail(request: echo_pb2.EchoRequest) -> None:
    if request.fail_with:
        raise _FAILURES[request.fail_with](request.message)


def _response(request: echo_pb2.EchoRequest, index: int) -> echo_pb2.EchoResponse:
    ctx = context.current()
    return echo_pb2.EchoResponse(
        message=request.message,
        request_id=ctx.request_id,
        user_id=ctx.principal.user_id if ctx.principal else "",
        index=index,
    )


class EchoServicer(echo_pb2_grpc.EchoServiceServicer):
    """Echoes, sleeps and fails on demand."""

    async def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> echo_pb2.EchoResponse:
        # Logs the caller's metadata on purpose: the redaction must catch it.
        metadata = list(context.invocation_metadata() or ())
        _log.info("echo", message=request.message, metadata=metadata)
        if request.sleep_seconds:
            await asyncio.sleep(request.sleep_seconds)
        _fail(request)
        return _response(request, 0)

    async def EchoStream(
        self, request: echo_pb2.EchoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[echo_pb2.EchoResponse]:
        for index in range(max(1, request.repeat)):
            yield _response(request, index)
            await asyncio.sleep(request.sleep_seconds)
        _fail(request)


def registration() -> Registration:
    # Unimplemented is left to the generated base class on purpose (it raises
    # NotImplementedError), which the stubs call abstract.
    servicer = EchoServicer()  # type: ignore[abstract]
    return Registration(SERVICE_NAME, servicer, echo_pb2_grpc.add_EchoServiceServicer_to_server)


class TokenAuthenticator:
    """Accepts ``authorization: Bearer <token>`` for the tokens it was given."""

    def __init__(self, principals: Mapping[str, context.Principal]) -> None:
        self._principals = dict(principals)
        self.seen: list[str] = []

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> context.Principal:
        self.seen.append(method)
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        principal = self._principals.get(token) if scheme.lower() == "bearer" else None
        if principal is None:
            raise errors.Unauthenticated("missing or unknown token")
        return principal


class AnyBearerAuthenticator:
    """Accepts any bearer token as the same caller (for the process-level tests)."""

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> context.Principal:
        if not metadata.get("authorization", "").lower().startswith("bearer "):
            raise errors.Unauthenticated("no bearer token")
        return principal("bearer-user")


def principal(user: str, roles: frozenset[str] = frozenset({"member"})) -> context.Principal:
    return context.Principal(
        user_id=context.UserId(user),
        user_name=user,
        project_id=context.ProjectId("project-1"),
        roles=roles,
    )
