"""Every gRPC channel in nubis is made here: TLS, keepalive, retries, auth and request ids.

`make_channel` returns a grpc.aio.Channel whose calls carry
``authorization: Bearer <token>`` (when a token is given) and an
``x-request-id`` (the caller's own if it sent one), get a default deadline when
unary, and are retried by grpc itself on UNAVAILABLE.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.settings import TlsSettings

REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"


@dataclass(frozen=True)
class CallPolicy:
    """Timeouts, retries and keepalive of the calls made on one channel."""

    timeout: float = 10.0
    """Deadline in seconds of a unary call made without one. Streams get none:
    a Watch lives as long as the caller wants."""
    max_attempts: int = 4
    """Attempts of a call that fails with a retryable code, the first included
    (1: no retries; grpc caps it at 5)."""
    initial_backoff: float = 0.2
    """Seconds before the first retry; grpc randomises each wait below the bound."""
    max_backoff: float = 3.0
    """Upper bound in seconds of the wait between two attempts."""
    backoff_multiplier: float = 2.0
    """Growth of the wait bound from one attempt to the next."""
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)
    """Codes that mean the call did not run (a replica restarting, a dropped
    connection). Writes are idempotent through their request_id, so a rare
    retry of a call that did run is harmless."""
    keepalive_time: float = 30.0
    """Seconds between keepalive pings, so a dead peer is noticed on idle
    connections (long Watch streams) instead of hanging."""
    keepalive_timeout: float = 10.0
    """Seconds to wait for a ping's answer before the connection is declared dead."""
    max_message_bytes: int = 16 * 1024 * 1024
    """Largest message sent or received (a console log can be large)."""
    stream_window_bytes: int | None = None
    """A fixed HTTP/2 flow-control window per stream, with grpc's window probing off:
    a slow reader of a long stream (an image download) then holds at most about
    this much unread. None: grpc's adaptive window, which grows with the link."""


def _service_config(policy: CallPolicy) -> str:
    method_config: dict[str, Any] = {"name": [{}]}  # every service and method of the channel
    # grpc rejects a retry policy of fewer than 2 attempts: 1 means no retries.
    if policy.max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": policy.max_attempts,
            "initialBackoff": f"{policy.initial_backoff}s",
            "maxBackoff": f"{policy.max_backoff}s",
            "backoffMultiplier": policy.backoff_multiplier,
            "retryableStatusCodes": list(policy.retryable_codes),
        }
    return json.dumps({"methodConfig": [method_config]})


def channel_options(policy: CallPolicy) -> list[tuple[str, Any]]:
    """grpc channel arguments for `policy`."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(policy)),
        ("grpc.keepalive_time_ms", int(policy.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(policy.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", policy.max_message_bytes),
        ("grpc.max_receive_message_length", policy.max_message_bytes),
    ]
    if policy.stream_window_bytes:
        options += [("grpc.http2.bdp_probe", 0),
                    ("grpc.http2.lookahead_bytes", policy.stream_window_bytes)]
    return options


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials:
    """TLS credentials: verify the server with ca_file; present cert/key for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )


class _CallDecorator:
    """Adds the metadata and default deadline every nubis call carries."""

    def __init__(self, token: str | None, timeout: float) -> None:
        self._token = token
        self._timeout = timeout

    def details(
        self, details: grpc.aio.ClientCallDetails, *, unary: bool
    ) -> grpc.aio.ClientCallDetails:
        pairs: list[tuple[str, str | bytes]] = list(details.metadata or ())
        sent = {key for key, _ in pairs}
        if REQUEST_ID_KEY not in sent:
            pairs.append((REQUEST_ID_KEY, f"req-{uuid.uuid4().hex}"))
        if self._token and AUTHORIZATION_KEY not in sent:
            pairs.append((AUTHORIZATION_KEY, f"Bearer {self._token}"))
        metadata = grpc.aio.Metadata(*pairs)
        timeout = details.timeout
        if timeout is None and unary:
            timeout = self._timeout
        return grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_CallDecorator, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self.details(client_call_details, unary=True), request)


class _UnaryStream(_CallDecorator, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self.details(client_call_details, unary=False), request)


class _StreamUnary(_CallDecorator, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self.details(client_call_details, unary=False), request_iterator)


class _StreamStream(_CallDecorator, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self.details(client_call_details, unary=False), request_iterator)


def make_channel(
    address: str,
    *,
    settings: TlsSettings | None = None,
    token: str | None = None,
    policy: CallPolicy | None = None,
) -> grpc.aio.Channel:
    """A channel to `address` ("host:port"); TLS when `settings.enabled`.

    Must be created inside the event loop that will use it.
    """
    policy = policy or CallPolicy()
    kinds = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
    interceptors: Sequence[Any] = [kind(token, policy.timeout) for kind in kinds]
    options = channel_options(policy)
    if settings is not None and settings.enabled:
        return grpc.aio.secure_channel(
            address, channel_credentials(settings), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
