"""Run one declared call to another service: a replica from the catalog, the service token,
the deadline, retries where they are safe, and the callee's status back as a domain error.

A call holds one deadline (its declared timeout, or the caller's) across all of
its attempts. An attempt that answers UNAVAILABLE marks that replica suspect,
has the catalog read again and, if the call may be retried (peers.rpc), is
sent again to the next replica after a jittered exponential backoff, up to
`attempts` times. A call that could not even be sent (no endpoint known yet,
identity out of reach for the token) is retried whatever its kind. An
UNAUTHENTICATED answer (a revoked token) makes one new login and one more
attempt. Any other status is raised as the domain error it stands for.

A server stream is opened the same way (until its first message, retried
like a call of its kind); after that a failure is raised, never retried, and
the deadline covers the whole stream.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import structlog
from google.protobuf.message import Message
from nubis.identity.v1 import identity_pb2

from services.client import channel as channels
from services.client import rpc_errors
from services.client.peers import endpoints, stubs
from services.client.peers import token as service_token
from services.client.peers.rpc import Req, Resp, Rpc, ServerStream
from services.client.peers.settings import ClientSettings
from services.common import context, errors

log = structlog.get_logger(__name__)

NO_CREDENTIAL = "nubis.client.no_credential"
DEADLINE = "nubis.client.deadline_exceeded"
# Seconds the calls still running on a replaced channel get before it closes.
_RETIRE_GRACE = 60.0
THROTTLED = "nubis.auth.throttled"
LOGIN_PATIENCE = 15.0
"""Seconds a service keeps asking when identity throttles its service user's logins."""
# grpc must not retry on its own: only the caller knows which calls may run twice.
_CHANNEL_POLICY = channels.CallPolicy(max_attempts=1)

T = TypeVar("T")


class _Retry(Exception):
    """An attempt failed in a way another attempt may cure."""

    def __init__(self, error: errors.NubisError, *, sent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.sent = sent


class _Refused(Exception):
    """The callee refused the token the attempt carried."""

    def __init__(self, error: errors.NubisError, bearer: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.bearer = bearer


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _caller_request_id() -> str | None:
    """The request id of the RPC this call is made for, so logs of both services join up."""
    try:
        return context.current().request_id
    except RuntimeError:
        return None


class Caller:
    """Runs the declared calls of one process (peers.rpc.Invoker); see the module docstring."""

    def __init__(self, settings: ClientSettings, *, rng: random.Random | None = None,
                 token: service_token.TokenSource | None = None) -> None:
        self.settings = settings
        self._rng = rng or random.Random()
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Replaced channels, closing once their calls end (or after a grace).
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}
        self.directory = endpoints.EndpointDirectory(
            self.list_endpoints,
            fixed={**settings.endpoints, stubs.IdentityClient.NAME: settings.identity_address},
            max_age=settings.catalog_max_age, suspect_seconds=settings.suspect_seconds)
        # The credential's token, renewed before it expires, unless one is given.
        self.token: service_token.TokenSource = token or service_token.ServiceToken(
            self._login, renew_fraction=settings.renew_fraction)

    async def warm(self, services: tuple[str, ...], *, within: float) -> None:
        """The token, and a connected channel to a replica of each of `services`, made now
        rather than by the first calls (which then wait for none of it). Within `within`
        seconds, each part asked again while it cannot be made yet (identity or a peer
        still starting); what is not made by then is left to the first call."""
        ends_at = time.monotonic() + within
        pause = self.settings.initial_backoff
        wanted = list(services)
        # Without a credential there is nothing to log in with: the calls will say so.
        token_ok = (self.settings.credential is None
                    and isinstance(self.token, service_token.ServiceToken))
        while True:
            try:
                if not token_ok:
                    await self.token.current()
                    token_ok = True
                while wanted:
                    address = await self.directory.pick(wanted[0])
                    await asyncio.wait_for(self._channel(address).channel_ready(),
                                           max(0.1, ends_at - time.monotonic()))
                    wanted.pop(0)
                return
            except (errors.Unavailable, errors.ResourceExhausted, TimeoutError) as exc:
                left = ends_at - time.monotonic()
                if left <= 0:
                    log.info("peers not warmed; the first calls will", services=wanted,
                             error=str(exc))
                    return
            except errors.NubisError as exc:  # a refused credential: its calls will say so
                log.warning("service login refused", error=exc.message, reason=exc.reason)
                return
            await asyncio.sleep(min(pause, left))
            pause = min(pause * self.settings.backoff_multiplier, self.settings.max_backoff)

    async def call(self, rpc: Rpc[Req, Resp], request: Req, deadline: float | None) -> Resp:
        """Run `rpc` within `deadline` seconds (None: its declared timeout); the callee's
        domain error, or Unavailable naming it, if it fails."""
        budget = rpc.timeout if deadline is None else deadline
        ends_at = time.monotonic() + budget
        return await self._retrying(
            rpc, request, ends_at,
            lambda: self._within(rpc, ends_at, budget, self._attempt(rpc, request, ends_at)))

    async def stream(self, rpc: ServerStream[Req, Resp], request: Req,
                     deadline: float | None) -> AsyncIterator[Resp]:
        """The messages of the server stream `rpc`, all within `deadline` seconds (None: its
        declared timeout); opening it is retried like a call, a failure after the first
        message is raised as the callee's domain error (or Unavailable naming it)."""
        budget = rpc.timeout if deadline is None else deadline
        ends_at = time.monotonic() + budget
        call, address, first = await self._retrying(
            rpc, request, ends_at,
            lambda: self._within(rpc, ends_at, budget, self._open(rpc, request, ends_at)))
        try:
            message = first
            while message is not None:
                yield message
                message = await self._within(rpc, ends_at, budget,
                                             self._read(rpc, call, address))
        finally:
            call.cancel()

    async def _retrying(self, rpc: Rpc[Req, Resp], request: Req, ends_at: float,
                        attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Run attempts until one succeeds, retrying where the module docstring says."""
        attempt, renewed = 0, False
        refusal: errors.NubisError | None = None
        while True:
            try:
                return await attempt_once()
            except _Refused as refused:
                if renewed:
                    raise refused.error from None
                renewed = True
                refusal = refused.error
                self.token.refused(refused.bearer)
            except errors.Unauthenticated as exc:
                # A given token cannot be renewed: the call that found it refused says
                # why the callee refused it (revoked, expired), later calls say it was.
                if refusal is not None and exc.reason == service_token.REFUSED:
                    raise refusal from None
                raise
            except _Retry as failure:
                attempt += 1
                await self._back_off(rpc, request, failure, attempt, ends_at)

    async def close(self) -> None:
        """Close every channel (calls still running on them are cancelled)."""
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in [*self._channels.values(), *retiring.values()]:
            await channel.close()
        self._channels.clear()

    async def _back_off(self, rpc: Rpc[Req, Resp], request: Req, failure: _Retry, attempt: int,
                        ends_at: float) -> None:
        """Sleep before attempt number `attempt`, or raise the failure if none may follow."""
        if failure.sent and not rpc.retryable(request):
            raise failure.error from None
        settings = self.settings
        bound = min(settings.max_backoff,
                    settings.initial_backoff * settings.backoff_multiplier ** (attempt - 1))
        wait = bound / 2 + self._rng.uniform(0, bound / 2)
        if attempt >= settings.attempts or time.monotonic() + wait >= ends_at:
            raise failure.error from None
        log.info("retrying call", service=rpc.service, method=rpc.name, attempt=attempt + 1,
                 wait=round(wait, 3), error=failure.error.message)
        await asyncio.sleep(wait)

    async def _within(self, rpc: Rpc[Req, Resp], ends_at: float, budget: float,
                      step: Awaitable[T]) -> T:
        """`step`, or Unavailable naming the callee once the call's deadline passes."""
        remaining = ends_at - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            # The token and the endpoint lookup count against the deadline too.
            async with asyncio.timeout(remaining):
                return await step
        except TimeoutError:
            raise errors.Unavailable(
                f"{rpc.service} did not answer {rpc.name} within {budget:g}s", reason=DEADLINE,
                metadata={"service": rpc.service, "method": rpc.name}) from None
        finally:
            if asyncio.iscoroutine(step):
                step.close()  # never awaited when the deadline had already passed

    async def _prepare(self, rpc: Rpc[Req, Resp]) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        """A replica's address, the bearer token and the metadata of one attempt."""
        try:
            address = await self.directory.pick(rpc.service)
            bearer = await self.token.current() if rpc.authenticated else ""
        except errors.Unavailable as exc:
            raise _Retry(exc, sent=False) from None
        metadata: list[tuple[str, str]] = []
        if bearer:
            metadata.append((channels.AUTHORIZATION_KEY, f"Bearer {bearer}"))
        request_id = _caller_request_id()
        if request_id:
            metadata.append((channels.REQUEST_ID_KEY, request_id))
        return address, bearer, tuple(metadata)

    async def _open(self, rpc: ServerStream[Req, Resp], request: Req, ends_at: float,
                    ) -> tuple[grpc.aio.UnaryStreamCall[Req, Resp], str, Resp | None]:
        """Start the stream on a replica and read its first message (None: it was empty)."""
        address, bearer, metadata = await self._prepare(rpc)
        method = self._channel(address).unary_stream(
            rpc.path, request_serializer=_serialize, response_deserializer=rpc.deserialize)
        call = method(request, timeout=max(0.0, ends_at - time.monotonic()), metadata=metadata)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._failure(rpc, address, bearer, exc) from None
        except BaseException:
            call.cancel()
            raise
        return call, address, None if first is grpc.aio.EOF else first  # type: ignore[return-value]

    async def _read(self, rpc: ServerStream[Req, Resp], call: grpc.aio.UnaryStreamCall[Req, Resp],
                    address: str) -> Resp | None:
        """The stream's next message (None at its end); a failure is final."""
        try:
            message = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                self.directory.failed(rpc.service, address)
            raise rpc_errors.domain_error(exc, rpc.service) from None
        return None if message is grpc.aio.EOF else message  # type: ignore[return-value]

    async def _attempt(self, rpc: Rpc[Req, Resp], request: Req, ends_at: float) -> Resp:
        address, bearer, metadata = await self._prepare(rpc)
        method = self._channel(address).unary_unary(
            rpc.path, request_serializer=_serialize, response_deserializer=rpc.response.FromString)
        try:
            reply: Resp = await method(request, timeout=max(0.0, ends_at - time.monotonic()),
                                       metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise self._failure(rpc, address, bearer, exc) from None
        return reply

    def _failure(self, rpc: Rpc[Req, Resp], address: str, bearer: str,
                 exc: grpc.aio.AioRpcError) -> Exception:
        error = rpc_errors.domain_error(exc, rpc.service)
        code = exc.code()
        if code is grpc.StatusCode.UNAUTHENTICATED and bearer:
            return _Refused(error, bearer)
        if code is grpc.StatusCode.UNAVAILABLE:
            self.directory.failed(rpc.service, address)
            # A fresh channel dials at once; the old one may sit in its reconnect backoff.
            self._retire(address)
            return _Retry(error, sent=True)
        return error

    def _channel(self, address: str) -> grpc.aio.Channel:
        found = self._channels.get(address)
        if found is None:
            known = self.directory.known()
            for gone in [a for a in self._channels if a not in known]:
                self._retire(gone)
            found = channels.make_channel(address, settings=self.settings.tls,
                                          policy=_CHANNEL_POLICY)
            self._channels[address] = found
        return found

    def _retire(self, address: str) -> None:
        retired = self._channels.pop(address, None)
        if retired is not None:
            task = asyncio.create_task(retired.close(grace=_RETIRE_GRACE))
            self._retiring[task] = retired
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _login(self) -> identity_pb2.AuthenticateResponse:
        credential = self.settings.credential
        if credential is None:
            raise errors.FailedPrecondition(
                "no service credential is configured (service_auth.password or "
                "service_auth.password_file)", reason=NO_CREDENTIAL)
        request = identity_pb2.AuthenticateRequest(
            username=credential.user, password=credential.password, project=credential.project)
        # Identity counts a login before it checks the password, so more of one user's logins
        # at once than its failure limit are throttled however right they are (every agent of
        # a cloud starting together logs in as the one service user), until one of them
        # succeeds and resets the count: such a refusal is asked again shortly, with jitter.
        # A wrong password stays throttled, and is refused once the patience is spent.
        gives_up_at = time.monotonic() + LOGIN_PATIENCE
        pause = self.settings.initial_backoff
        while True:
            try:
                return await self.call(stubs.IdentityClient.Authenticate, request, None)
            except errors.ResourceExhausted as exc:
                wait = self._rng.uniform(pause / 2, pause)
                if exc.reason != THROTTLED or time.monotonic() + wait >= gives_up_at:
                    raise
                log.info("service login throttled; asking again", user=credential.user,
                         pause=round(wait, 3))
                await asyncio.sleep(wait)
                pause = min(pause * self.settings.backoff_multiplier, self.settings.max_backoff)

    async def list_endpoints(self, name: str) -> list[str]:
        """Every address identity's catalog lists for service `name` now (not cached)."""
        reply = await self.call(stubs.IdentityClient.ListEndpoints,
                                identity_pb2.ListEndpointsRequest(name=name), None)
        return [endpoint.address for endpoint in reply.endpoints]
