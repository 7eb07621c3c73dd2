"""Connections to the etcd members, failover between them, and etcd errors as domain errors.

One `Connection` keeps an aetcd client per endpoint and uses one at a time.
When a call fails because the member is gone, leaderless or too slow, the
connection moves to the next endpoint and retries within the call's timeout.
Writes report whether an earlier attempt might have been applied, so the
caller can tell its own success from a conflict (see kv.py and txn.py).
"""

from __future__ import annotations

import asyncio
import operator
import random
import time
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

Rpc = Callable[["Member"], Callable[..., Awaitable[Any]]]
"""Picks a unary etcd method off a member's stubs, e.g. ``KV_RANGE(member)(request)``."""
KV_RANGE: Rpc = operator.attrgetter("kv.Range")
KV_TXN: Rpc = operator.attrgetter("kv.Txn")
KV_COMPACT: Rpc = operator.attrgetter("kv.Compact")


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


def _closed_error() -> errors.Unavailable:
    """The error of a call on a closed store."""
    return errors.Unavailable("the store is closed", reason="nubis.store.closed")


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
        self._first_budget = min(self.timeout, self.attempt_timeout)
        # Built once: grpc turns a tuple into a Metadata object on every call (~3 us).
        self.metadata = grpc.aio.Metadata(*REQUIRE_LEADER)

    @property
    def endpoint(self) -> str:
        """host:port of the member the store uses now."""
        host, port = self._addresses[self._index]
        return f"{host}:{port}"

    async def current(self) -> Member:
        """The member in use, connecting lazily."""
        if self._closed:
            raise _closed_error()
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

    async def unary(self, method: Rpc, request: Any) -> tuple[Any, bool]:
        """``method(member)(request)`` with failover; returns what `run` returns.

        Every store read and write comes through here, so the usual case (an open
        member answers the first attempt) costs no closure, no extra coroutine
        and no deadline arithmetic; only a failure pays for the retry bookkeeping.
        """
        member = self._members[self._index]
        if member is None or self._closed:  # not connected yet, or closed: `run` sorts it out
            return await self.run(self._unary_op(method, request))
        started = time.monotonic()
        try:
            return await method(member)(
                request, timeout=self._first_budget, metadata=self.metadata
            ), False
        except grpc.aio.AioRpcError as exc:
            first_error = exc
        except grpc.aio.UsageError:
            raise _closed_error() from None
        maybe_applied = self._failed(member, first_error)
        return await self._attempts(
            self._unary_op(method, request), started, 1, maybe_applied, first_error
        )

    def _unary_op(self, method: Rpc, request: Any) -> Callable[[Member, float], Awaitable[Any]]:
        def op(member: Member, budget: float) -> Awaitable[Any]:
            return method(member)(request, timeout=budget, metadata=self.metadata)

        return op

    async def run(self, op: Callable[[Member, float], Awaitable[T]]) -> tuple[T, bool]:
        """Run `op(member, timeout)`, failing over until it succeeds or the timeout runs out.

        Returns the result and whether an earlier attempt failed after its
        request may have reached etcd (so a write may already be applied).
        """
        return await self._attempts(op, time.monotonic(), 0, False, None)

    async def _attempts(
        self,
        op: Callable[[Member, float], Awaitable[T]],
        started: float,
        attempt: int,
        maybe_applied: bool,
        last_error: grpc.aio.AioRpcError | None,
    ) -> tuple[T, bool]:
        """The retry loop of `run`, from attempt number `attempt` on."""
        deadline = started + self.timeout
        while True:
            if last_error is not None:
                # A first pass over the other members is immediate; then back off.
                delay = 0.0 if attempt < len(self._addresses) else retry_delay(attempt)
                if time.monotonic() + delay >= deadline:
                    raise errors.Unavailable(
                        f"etcd unavailable after {attempt} attempts: "
                        f"{last_error.code().name}: {last_error.details()}",
                        reason="nubis.store.unavailable",
                    ) from None
                await asyncio.sleep(delay)
            member = self._members[self._index] or await self.current()
            if self._closed:
                raise _closed_error()
            budget = min(deadline - time.monotonic(), self.attempt_timeout)
            try:
                return await op(member, budget), maybe_applied
            except grpc.aio.AioRpcError as exc:
                maybe_applied = self._failed(member, exc) or maybe_applied
                last_error = exc
            except grpc.aio.UsageError:
                raise _closed_error() from None
            attempt += 1

    def _failed(self, member: Member, exc: grpc.aio.AioRpcError) -> bool:
        """Handle a failed attempt: raise if retrying cannot help, else fail over.

        Returns whether the failed request may have been applied.
        """
        if not is_retryable(exc):
            raise translate(exc) from None
        self.failover(member, f"{exc.code().name}: {exc.details()}")
        return was_sent(exc)

    async def close(self) -> None:
        """Close every channel; calls after this raise Unavailable."""
        self._closed = True
        members = [m for m in self._members if m is not None]
        self._members = [None] * len(self._addresses)
        for member in members:
            await member.client.close()
