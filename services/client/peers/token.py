"""The service's own token: issued by identity on first use, renewed before it expires.

One `ServiceToken` serves every call of a process. It logs in with the
service credential when a call first needs a token, renews it once less than
`renew_fraction` of its lifetime is left (so no call carries a token about to
expire), and forgets it when a callee refused it (revoked, or the signing key
rotated away) so that the next call logs in again. Concurrent callers share
one login: the others wait for it instead of logging in too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from nubis.identity.v1 import identity_pb2

from services.common import errors

Login = Callable[[], Awaitable[identity_pb2.AuthenticateResponse]]
Clock = Callable[[], float]

REFUSED = "nubis.client.token_refused"


class TokenSource(Protocol):
    """Where a caller's bearer token comes from (ServiceToken, StaticToken)."""

    logins: int
    """How many tokens were issued to it (0 for a given token)."""

    async def current(self) -> str: ...

    def refused(self, token: str) -> None: ...


class StaticToken:
    """A token given from outside (NUBIS_TOKEN, a stored `nubis login`): used as it is.

    Nothing can renew it: once a callee refused it (expired, revoked), every
    later call fails with Unauthenticated at once instead of sending it again.
    """

    def __init__(self, token: str) -> None:
        self._token = token
        self._refused = False
        self.logins = 0

    async def current(self) -> str:
        if self._refused:
            raise errors.Unauthenticated("the token was refused (expired or revoked); "
                                         "log in again", reason=REFUSED)
        return self._token

    def refused(self, token: str) -> None:
        if token == self._token:
            self._refused = True


@dataclass(frozen=True)
class _Issued:
    token: str
    token_id: str
    renew_at: float
    """Monotonic time from which the token is renewed before use."""


class ServiceToken:
    """The bearer token of a process's service-to-service calls."""

    def __init__(self, login: Login, *, renew_fraction: float,
                 clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self._login = login
        self._renew_fraction = renew_fraction
        self._clock = clock
        self._wall_clock = wall_clock
        self._issued: _Issued | None = None
        self._lock = asyncio.Lock()
        self.logins = 0
        """How many tokens identity issued to this process (for metrics and tests)."""

    @property
    def token_id(self) -> str:
        """Id (jti) of the token in use, "" before the first login."""
        return self._issued.token_id if self._issued is not None else ""

    async def current(self) -> str:
        """A token with more than `renew_fraction` of its lifetime left (logs in if needed)."""
        issued = self._issued
        if issued is not None and self._clock() < issued.renew_at:
            return issued.token
        async with self._lock:
            issued = self._issued
            if issued is None or self._clock() >= issued.renew_at:
                issued = await self._issue()
                self._issued = issued
            return issued.token

    def refused(self, token: str) -> None:
        """A callee answered UNAUTHENTICATED to `token`: the next call logs in again.

        Only that token is dropped: a newer one another call already got stays.
        """
        if self._issued is not None and self._issued.token == token:
            self._issued = None

    async def _issue(self) -> _Issued:
        reply = await self._login()
        self.logins += 1
        # expire_time is on identity's wall clock: what is left of it by ours is
        # scheduled on the monotonic clock, so a later clock step cannot delay it.
        lifetime = max(0.0, reply.expire_time.ToNanoseconds() / 1e9 - self._wall_clock())
        renew_at = self._clock() + lifetime * (1.0 - self._renew_fraction)
        return _Issued(reply.token, reply.token_id, renew_at)
