"""Connections to the etcd members, failover between them, and etcd errors as domain errors.

One `Connection` keeps an aetcd client per endpoint and uses one at a time.
When a call fails because the member is gone, leaderless or too slow, the
connection moves to the next endpoint and retries within the call's timeout.
Writes report whether an earlier attempt might have been applied, so the
caller can tell its own success from a conflict (see kv.py and txn.py).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import grpc
import structlog
from aetcd import rpc

from services.common import errors

T = TypeVar("T")

# etcd rejects calls at once on a member that has no leader instead of queueing them
# until an election ends; we then fail over rather than wait on a partitioned member.
REQUIRE_LEADER = (("hasleader", "true"),)

_CHANNEL_OPTIONS = {
    # Notice a silently dead peer (no RST) within ~15 s, even on idle watch streams.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    # A restarted member becomes usable again quickly.
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1_000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}

# Errors after which the same call may succeed elsewhere or a moment later.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# etcd answers these when a proposal was lost in a leader change; they are transient too.
_TRANSIENT_DETAILS = (
    "proposal dropped", "leader changed", "request timed out", "no leader",
    "context deadline exceeded",
)
# Failures that prove the request never reached a member, so a write was not applied.
_NOT_SENT_DETAILS = ("failed to connect", "connection refused", "no leader")

log = structlog.get_logger(__name__)


def parse_endpoint(endpoint: object) -> tuple[str, int]:
    """``host:port`` (optionally ``http://``) as (host, port); InvalidArgument otherwise."""
    if isinstance(endpoint, str):
        text = endpoint.removeprefix("http://").rstrip("/")
        host, _, port = text.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return host.strip("[]"), int(port)
    raise errors.InvalidArgument(
        f"invalid etcd endpoint {endpoint!r}: expected host:port",
        violations=[errors.FieldViolation("etcd.endpoints", "expected host:port")],
    )


@dataclass
class Member:
    """One etcd endpoint with its aetcd client and the stubs the store calls."""

    endpoint: str
    client: aetcd.Client
    kv: Any
    lease: Any
    watch: Any


def is_retryable(exc: grpc.aio.AioRpcError) -> bool:
    """True if `exc` means "try again, maybe on another member"."""
    code = exc.code()
    if code in _RETRYABLE:
        return True
    details = exc.details() or ""
    return code == grpc.StatusCode.UNKNOWN and any(d in details for d in _TRANSIENT_DETAILS)


def was_sent(exc: grpc.aio.AioRpcError) -> bool:
    """False when the failure proves the request was never applied."""
    details = exc.details() or ""
    return not any(d in details for d in _NOT_SENT_DETAILS)


def translate(exc: grpc.aio.AioRpcError) -> errors.NubisError:
    """The domain error for an etcd gRPC error (never a raw gRPC error upwards)."""
    code, details = exc.code(), exc.details() or ""
    if "compacted" in details:
        return errors.FailedPrecondition(
            f"etcd: {details}", reason="nubis.store.compacted"
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE) \
            or "larger than max" in details:
        return errors.InvalidArgument(f"etcd rejected the request: {details}",
                                      reason="nubis.store.rejected")
    if code == grpc.StatusCode.NOT_FOUND:
        return errors.NotFound(f"etcd: {details}", reason="nubis.store.lease_not_found")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.Unavailable(f"etcd: {details}", reason="nubis.store.no_space")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return errors.FailedPrecondition(f"etcd: {details}", reason="nubis.store.precondition")
    return errors.Unavailable(f"etcd unavailable: {code.name}: {details}",
                              reason="nubis.store.unavailable")


def retry_delay(attempt: int, *, base: float = 0.05, cap: float = 0.5) -> float:
    """Jittered exponential backoff, so that retrying callers spread out."""
    return random.uniform(base / 2, min(cap, base * 2**attempt))


class Connection:
    """The etcd members of one cluster and the one currently in use."""

    def __init__(self, endpoints: list[str], timeout: float) -> None:
        if not isinstance(endpoints, list | tuple) or not endpoints:
            raise errors.InvalidArgument(
                "at least one etcd endpoint is required",
                violations=[errors.FieldViolation("etcd.endpoints", "must not be empty")],
            )
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise errors.InvalidArgument(
                f"invalid etcd timeout {timeout!r}",
                violations=[errors.FieldViolation("etcd.timeout", "must be > 0 seconds")],
            )
        self._addresses = [parse_endpoint(e) for e in endpoints]
        self._members: list[Member | None] = [None] * len(self._addresses)
        self._index = 0
        self._closed = False
        self.timeout = float(timeout)
        # One attempt may use only part of the call's budget: right after a leader dies,
        # followers hold requests until their own election timeout, and a retry a
        # moment later on another member is what gets through within the budget.
        self.attempt_timeout = max(0.5, self.timeout / 4)

    @property
    def endpoint(self) -> str:
        """host:port of the member the store uses now."""
        host, port = self._addresses[self._index]
        return f"{host}:{port}"

    async def current(self) -> Member:
        """The member in use, connecting lazily."""
        if self._closed:
            raise errors.Unavailable("the store is closed", reason="nubis.store.closed")
        member = self._members[self._index]
        if member is None:
            member = await self._open(self._index)
        return member

    async def _open(self, index: int) -> Member:
        host, port = self._addresses[index]
        client = aetcd.Client(host=host, port=port, options=_CHANNEL_OPTIONS)
        await client.connect()
        member = Member(
            endpoint=f"{host}:{port}",
            client=client,
            kv=client.kvstub,
            lease=client.leasestub,
            watch=rpc.WatchStub(client.channel),
        )
        self._members[index] = member
        return member

    def failover(self, failed: Member, reason: str) -> None:
        """Move to the next endpoint, unless another call already moved away from `failed`."""
        if self._members[self._index] is not failed or len(self._addresses) == 1:
            return
        self._index = (self._index + 1) % len(self._addresses)
        log.warning("etcd.failover", failed=failed.endpoint, next=self.endpoint, reason=reason)

    async def run(self, op: Callable[[Member, float], Awaitable[T]]) -> tuple[T, bool]:
        """Run `op(member, timeout)`, failing over until it succeeds or the timeout runs out.

        Returns the result and whether an earlier attempt failed after its
        request may have reached etcd (so a write may already be applied).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        maybe_applied = False
        attempt = 0
        while True:
            # Skip a coroutine hop on the hot path: the member is almost always open.
            member = self._members[self._index] or await self.current()
            if self._closed:
                raise errors.Unavailable("the store is closed", reason="nubis.store.closed")
            budget = min(deadline - loop.time(), self.attempt_timeout)
            try:
                return await op(member, budget), maybe_applied
            except grpc.aio.AioRpcError as exc:
                if not is_retryable(exc):
                    raise translate(exc) from None
                maybe_applied = maybe_applied or was_sent(exc)
                self.failover(member, f"{exc.code().name}: {exc.details()}")
                last_error = exc
            except grpc.aio.UsageError:
                raise errors.Unavailable(
                    "the store is closed", reason="nubis.store.closed"
                ) from None
            attempt += 1
            # A first pass over the other members is immediate; then back off.
            delay = 0.0 if attempt < len(self._addresses) else retry_delay(attempt)
            if loop.time() + delay >= deadline:
                raise errors.Unavailable(
                    f"etcd unavailable after {attempt} attempts: "
                    f"{last_error.code().name}: {last_error.details()}",
                    reason="nubis.store.unavailable",
                ) from None
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close every channel; calls after this raise Unavailable."""
        self._closed = True
        members = [m for m in self._members if m is not None]
        self._members = [None] * len(self._addresses)
        for member in members:
            await member.client.close()
