"""Time-bucketed shared leases: one lease per bucket of deadlines instead of one per key.

Keys that only have to vanish some time after a deadline (request-id records,
revocation entries, login-failure counts) share the lease of the bucket their
deadline falls in. That lease ends at the bucket's end, so a key lives at least
until its deadline and at most one bucket width past it. Each process keeps the
lease of every bucket it uses, so however many keys it writes, its live leases
stay near (longest lifetime / width) + 1 per width.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable

from services.common import errors
from services.common.store.types import Lease

# A lease granted for the exact time left to its bucket's end could end a moment
# before a deadline at that end; a few seconds more cost nothing.
_SLACK = 5


class LeaseBuckets:
    """Per-process cache of the shared lease of each (width, bucket) in use."""

    def __init__(self, grant: Callable[[int], Awaitable[Lease]],
                 clock: Callable[[], float] = time.time) -> None:
        self._grant = grant
        self._clock = clock
        self._leases: dict[tuple[int, int], Lease] = {}
        self._lock: asyncio.Lock | None = None

    async def lease_until(self, deadline: float, width: int) -> Lease:
        """The shared lease outliving `deadline` (epoch seconds) by at most `width` seconds."""
        if not isinstance(width, int) or width < 1:
            raise errors.InvalidArgument(
                f"bucket width must be a positive number of seconds, not {width!r}",
                violations=[errors.FieldViolation("width", "must be a positive integer")])
        bucket = (width, math.ceil(max(deadline, self._clock()) / width))
        found = self._leases.get(bucket)
        if found is not None:
            return found
        if self._lock is None:
            self._lock = asyncio.Lock()
        # One grant per bucket even when many writers arrive at once.
        async with self._lock:
            found = self._leases.get(bucket)
            if found is None:
                self._prune()
                ends = bucket[0] * bucket[1]
                found = await self._grant(max(1, math.ceil(ends - self._clock()) + _SLACK))
                self._leases[bucket] = found
        return found

    def forget(self, lease_ids: Iterable[int]) -> bool:
        """Drop the cached leases among `lease_ids` (etcd lost them); True if any was ours."""
        lost = set(lease_ids)
        gone = [bucket for bucket, lease in self._leases.items() if lease.id in lost]
        for bucket in gone:
            del self._leases[bucket]
        return bool(gone)

    def _prune(self) -> None:
        """Forget buckets that have ended: no deadline from now on falls in them."""
        now = self._clock()
        for bucket in [b for b in self._leases if b[0] * b[1] < now]:
            del self._leases[bucket]
