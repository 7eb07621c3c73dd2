"""Login throttling every identity replica shares: a leased count of failures per user name.

An attempt is counted in etcd before its password hash is checked, in one
transaction that refuses it once `max_failures` attempts were counted within
`cooldown` seconds of the last one. Parallel guesses therefore cannot all pass
the check while their hashes run, on one replica or on many: the transactions
serialise on the record and exactly `max_failures` of them get through. A
wrong password leaves its count, a right one resets it; a name whose last
counted attempt is `cooldown` seconds old starts afresh (Keystone's lockout).
Unknown names are counted like known ones, so the throttle tells nothing
about which names exist. Records live under shared leases that end shortly
after the cooldown, so neither keys nor leases pile up under a spray of names.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, resources
from services.common.store import Store, Txn
from services.identity import keys

THROTTLED = "nubis.auth.throttled"


def _key(username: str) -> str:
    # Any string a caller sends may be a user name; its digest is always a safe key.
    return keys.login_failures(hashlib.sha256(username.encode()).hexdigest())


def _stamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


@dataclass(frozen=True)
class LoginThrottle:
    """Counts login attempts per user name in etcd; see the module docstring."""

    store: Store
    max_failures: int
    cooldown: float

    async def attempt(self, username: str) -> None:
        """Count one attempt of `username`; RESOURCE_EXHAUSTED if it is throttled now."""
        if not resources.is_name(username):
            return  # no account can have this name: nothing to protect, nothing stored

        async def body(txn: Txn) -> None:
            await self._count(txn, _key(username))

        # Every lost race is another attempt's commit, and at most max_failures
        # commit before the rest are refused without writing: enough reruns.
        await self.store.atomic(body, retries=self.max_failures + 16)

    async def _count(self, txn: Txn, key: str) -> None:
        now = time.time()
        current = await txn.get(key, identity_pb2.LoginFailures)
        counted = 0
        if current is not None:
            since = now - current.value.last_failure_time.ToNanoseconds() / 1e9
            if since < self.cooldown:
                counted = current.value.failures
            if counted >= self.max_failures:
                raise errors.ResourceExhausted(
                    "too many failed logins; try again later", reason=THROTTLED,
                    metadata={"retry_after_seconds": str(max(1, math.ceil(self.cooldown - since)))},
                )
        lease = await self.store.shared_lease(now + self.cooldown,
                                              width=max(1, math.ceil(self.cooldown / 4)))
        txn.put(key, identity_pb2.LoginFailures(failures=counted + 1,
                                                last_failure_time=_stamp(now)), lease=lease)

    async def succeeded(self, username: str) -> None:
        """The password was right: forget the name's failures."""
        if not resources.is_name(username):
            return

        async def body(txn: Txn) -> None:
            txn.delete(_key(username))

        await self.store.atomic(body)
