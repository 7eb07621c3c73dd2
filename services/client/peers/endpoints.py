"""Where each service is: its live endpoints, from identity's catalog, cached per service.

`EndpointDirectory.pick` hands out the addresses of a service in turn, so calls
spread over its replicas and a retry goes to another one. Addresses come from
ListEndpoints (identity's catalog of lease-bound entries); identity itself is
reached at the one configured address. A service's list is fetched when it is
first needed, when it is empty, when it is older than `max_age`, and after a
call found one of its endpoints unavailable (`failed`), which also puts that
endpoint behind the others for `suspect_seconds`.

Only a service with no address known waits for the catalog: a list that is
merely old is refreshed in the background while calls go on with it, and a
refresh that comes back empty while addresses are known (a replica's lease
late to renew under load) keeps them for up to `max_age` more, asking again
after `suspect_seconds`; so a slow or briefly empty catalog never turns into
"no endpoint" for a service that is up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from services.common import errors

Fetch = Callable[[str], Awaitable[list[str]]]
Clock = Callable[[], float]

NO_ENDPOINT = "nubis.client.no_endpoint"

log = structlog.get_logger(__name__)


@dataclass
class _Entry:
    addresses: list[str] = field(default_factory=list)
    fetched_at: float | None = None
    turn: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    emptied_at: float | None = None  # when the catalog first listed none of known addresses
    refreshing: asyncio.Task[None] | None = None


class EndpointDirectory:
    """The cached catalog of one process; see the module docstring."""

    def __init__(self, fetch: Fetch, *, fixed: Mapping[str, str], max_age: float,
                 suspect_seconds: float, clock: Clock = time.monotonic) -> None:
        self._fetch = fetch
        self._fixed = dict(fixed)
        self._max_age = max_age
        self._suspect_seconds = suspect_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._suspects: dict[str, float] = {}

    def known(self) -> set[str]:
        """Every address currently listed (the channels worth keeping)."""
        found = set(self._fixed.values())
        for entry in self._entries.values():
            found.update(entry.addresses)
        return found

    async def pick(self, name: str) -> str:
        """The next address of service `name`; Unavailable if the catalog lists none."""
        fixed = self._fixed.get(name)
        if fixed is not None:
            return fixed
        entry = self._entries.setdefault(name, _Entry())
        if not entry.addresses:
            await self._refresh_or_keep(name, entry)
        elif self._stale(entry) and (entry.refreshing is None or entry.refreshing.done()):
            entry.refreshing = asyncio.ensure_future(self._refresh_or_keep(name, entry))
        if not entry.addresses:
            raise errors.Unavailable(f"no {name} endpoint is registered in the catalog",
                                     reason=NO_ENDPOINT, metadata={"service": name})
        return self._next(entry)

    def failed(self, name: str, address: str) -> None:
        """A call to `address` found it unavailable: refresh `name` and try it last for a while."""
        now = self._clock()
        self._suspects = {a: until for a, until in self._suspects.items() if until > now}
        self._suspects[address] = now + self._suspect_seconds
        entry = self._entries.get(name)
        if entry is not None:
            entry.fetched_at = None

    def _stale(self, entry: _Entry) -> bool:
        return (not entry.addresses or entry.fetched_at is None
                or self._clock() - entry.fetched_at > self._max_age)

    async def _refresh_or_keep(self, name: str, entry: _Entry) -> None:
        """Refresh `entry`; when identity cannot answer, keep a list already known.

        A callee must stay reachable while identity is down, so its last known
        endpoints are used, and identity is asked again after suspect_seconds.
        """
        try:
            await self._refresh(name, entry)
        except errors.NubisError as exc:
            if not entry.addresses:
                raise
            log.warning("catalog refresh failed; using the endpoints known",
                        service=name, error=exc.message)
            self._retry_soon(entry)

    def _retry_soon(self, entry: _Entry) -> None:
        entry.fetched_at = self._clock() - self._max_age + self._suspect_seconds

    async def _refresh(self, name: str, entry: _Entry) -> None:
        started = self._clock()
        async with entry.lock:
            # Another call refreshed while this one waited: its list is new enough.
            if entry.fetched_at is not None and entry.fetched_at >= started:
                return
            found = sorted(await self._fetch(name))
            now = self._clock()
            if not found and entry.addresses:
                entry.emptied_at = now if entry.emptied_at is None else entry.emptied_at
                if now - entry.emptied_at <= self._max_age:
                    log.warning("catalog lists no endpoint; keeping the known ones a while",
                                service=name, known=entry.addresses)
                    self._retry_soon(entry)
                    return
            entry.emptied_at = None
            entry.addresses = found
            entry.fetched_at = now

    def _next(self, entry: _Entry) -> str:
        now = self._clock()
        count = len(entry.addresses)
        for step in range(count):
            address = entry.addresses[(entry.turn + step) % count]
            if self._suspects.get(address, 0.0) <= now:
                entry.turn += step + 1
                return address
        # Every replica failed lately: go round them all the same.
        address = entry.addresses[entry.turn % count]
        entry.turn += 1
        return address
