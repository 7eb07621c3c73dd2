"""Around every nubis RPC: request id, auth hook, request context, error mapping, log, metrics.

One server interceptor wraps each method handler of the services it serves
(health and reflection are left untouched). Per call it: takes the request id
from ``x-request-id`` (or makes one) and echoes it in trailing metadata;
refuses new calls while the server drains; runs the Authenticator unless the
method is public; binds a RequestContext and the log context for the
handler's whole life (streaming handlers too); maps domain errors through
`status`; turns anything else into INTERNAL without leaking it; writes one
access log line and the RPC metrics.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

import grpc
import structlog

from services.common import context as request_context
from services.common import errors
from services.common import logging as nubis_logging
from services.common.metrics import RpcMetrics
from services.common.server import status

REQUEST_ID_KEY = "x-request-id"
REASON_UNDECODABLE = "nubis.request.undecodable"
REASON_SHUTTING_DOWN = "nubis.server.shutting_down"

# Infrastructure services: never authenticated, counted or logged per call.
UNWRAPPED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# A client-chosen request id is kept only if it is short and plain, so it can
# go into log lines and metadata without escaping.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_log = structlog.get_logger("nubis.rpc")


class Authenticator(Protocol):
    """Proves who is calling; raises errors.Unauthenticated when it cannot."""

    async def authenticate(
        self, method: str, metadata: Mapping[str, str]
    ) -> request_context.Principal: ...


class Drain:
    """Counts the calls in flight and tells whether the server is draining."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, within: float) -> bool:
        """Wait until no call is in flight; False if `within` seconds ran out first."""
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so bad bytes reach the handler wrapper as a marker.

    Left to grpc, a deserializer exception becomes an unexplained status; as a
    marker it becomes INVALID_ARGUMENT through the normal error path.
    """
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


def _check_decoded(request: Any, method: str) -> None:
    if request is _UNDECODABLE:
        raise errors.InvalidArgument(
            f"request is not a valid message for {method}",
            reason=REASON_UNDECODABLE,
            metadata={"method": method},
        )


async def _checked_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        _check_decoded(request, method)
        yield request


def _text_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """Invocation metadata as a dict of its text entries (binary ``-bin`` keys left out)."""
    return {
        key: value
        for key, value in (context.invocation_metadata() or ())
        if isinstance(value, str) and not key.endswith("-bin")
    }


def _request_id(metadata: Mapping[str, str]) -> str:
    sent = metadata.get(REQUEST_ID_KEY, "")
    return sent if _REQUEST_ID.fullmatch(sent) else f"req-{uuid.uuid4().hex}"


def _code_name(code: object) -> str:
    """Name of a status code as grpc reports it (StatusCode, number or None)."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    return "OK"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """The interceptor every nubis server installs; see the module docstring."""

    def __init__(
        self,
        *,
        authenticator: Authenticator | None,
        public_methods: frozenset[str],
        metrics: RpcMetrics,
        drain: Drain,
    ) -> None:
        self._authenticator = authenticator
        self._public_methods = public_methods
        self._metrics = metrics
        self._drain = drain
        # Each method's handler as grpc gave it, and its wrapped form: made once, not per call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any],
                                       grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNWRAPPED_PREFIXES):
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        deserializer = _tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_unary(handler.unary_unary, method), deserializer, serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, method), deserializer, serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary, method), deserializer, serializer
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(handler.stream_stream, method), deserializer, serializer
            )
        return handler

    def _unary_unary(self, inner: Any, method: str) -> Any:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._serving(method, context):
                _check_decoded(request, method)
                return await inner(request, context)

        return behavior

    def _unary_stream(self, inner: Any, method: str) -> Any:
        async def behavior(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._serving(method, context):
                _check_decoded(request, method)
                async for response in _responses(inner(request, context)):
                    yield response

        return behavior

    def _stream_unary(self, inner: Any, method: str) -> Any:
        async def behavior(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            async with self._serving(method, context):
                return await inner(_checked_stream(requests, method), context)

        return behavior

    def _stream_stream(self, inner: Any, method: str) -> Any:
        async def behavior(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            async with self._serving(method, context):
                async for response in _responses(inner(_checked_stream(requests, method), context)):
                    yield response

        return behavior

    async def _authenticate(
        self, method: str, metadata: Mapping[str, str]
    ) -> request_context.Principal | None:
        if self._authenticator is None or method in self._public_methods:
            return None
        return await self._authenticator.authenticate(method, metadata)

    @asynccontextmanager
    async def _serving(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        """The life of one call around its handler (see the module docstring)."""
        metadata = _text_metadata(context)
        request_id = _request_id(metadata)
        trailing = ((REQUEST_ID_KEY, request_id),)
        context.set_trailing_metadata(trailing)
        started = time.monotonic()
        outcome = _Outcome()
        self._drain.enter()
        self._metrics.in_flight.inc()
        with nubis_logging.bind_request(request_id=request_id, method=method):
            try:
                if self._drain.draining:
                    raise errors.Unavailable("server is shutting down", reason=REASON_SHUTTING_DOWN)
                outcome.principal = await self._authenticate(method, metadata)
                bound = request_context.bind(
                    request_context.RequestContext(
                        request_id=request_context.RequestId(request_id),
                        method=method,
                        principal=outcome.principal,
                        peer=context.peer(),
                    )
                )
                try:
                    yield
                finally:
                    with suppress(ValueError):  # closed from another context: see logging
                        request_context.unbind(bound)
                outcome.code = _code_name(context.code())
            except errors.NubisError as exc:
                await self._abort(context, status.from_error(exc), trailing, outcome)
            except grpc.aio.AbortError:  # the handler aborted with a status of its own
                outcome.code = _code_name(context.code())
                raise
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                outcome.code = "CANCELLED"
                raise
            except NotImplementedError:
                # What a generated servicer base class raises for an RPC nobody wrote yet.
                await self._abort(context, status.unimplemented(method), trailing, outcome)
            except Exception:
                _log.exception("unhandled exception in handler")
                await self._abort(context, status.internal(request_id), trailing, outcome)
            finally:
                self._finish(method, started, outcome)

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        rich: grpc.Status,
        trailing: tuple[tuple[str, str], ...],
        outcome: _Outcome,
    ) -> None:
        outcome.code = rich.code.name
        outcome.message = rich.details
        await context.abort(rich.code, rich.details, (*rich.trailing_metadata, *trailing))

    def _finish(self, method: str, started: float, outcome: _Outcome) -> None:
        elapsed = time.monotonic() - started
        self._drain.leave()
        self._metrics.in_flight.dec()
        self._metrics.observe(method, outcome.code, elapsed)
        fields: dict[str, Any] = {"code": outcome.code, "duration_ms": round(elapsed * 1000, 3)}
        if outcome.principal is not None:
            fields["user_id"] = outcome.principal.user_id
            fields["project_id"] = outcome.principal.project_id
        if outcome.message:
            fields["error"] = outcome.message
        _log.info("rpc", **fields)


class _Outcome:
    """What the access log and metrics record about one finished call."""

    def __init__(self) -> None:
        self.code = "UNKNOWN"
        self.message = ""
        self.principal: request_context.Principal | None = None


async def _responses(result: Any) -> AsyncIterator[Any]:
    """Responses of a streaming handler: an async generator, or None after context.write()."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    elif result is not None:
        await result
