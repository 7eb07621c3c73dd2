"""Writing revocations: single token ids, and every older token of a user or project.

Entries live under etcd leases that end when the tokens they block would have
expired anyway, so the revocation lists every service keeps in memory stay small.
"""

from __future__ import annotations

import time

from nubis.identity.v1 import identity_pb2

from services.common.store import Lease, Store, Txn
from services.identity import paths, records

# Extra lifetime past the longest token, so clock skew between hosts cannot
# let a revoked token outlive its revocation entry.
_MARGIN = 60


def subject_ttl(token_ttl: int) -> int:
    """Lease TTL of a user/project revocation: as long as any older token can live."""
    return token_ttl + _MARGIN


def revoke_subject(txn: Txn, kind: str, subject_id: str, lease: Lease) -> None:
    """In `txn`: every token of the user/project issued until now is revoked."""
    txn.put(
        paths.revoked_subject(kind, subject_id),
        identity_pb2.RevokedSubject(kind=kind, id=subject_id, revoke_time=records.now()),
        lease=lease,
    )


async def revoke_token(store: Store, token_id: str, expires_at: float) -> None:
    """Revoke one token id until it would have expired (idempotent)."""
    remaining = max(1, int(expires_at - time.time()) + _MARGIN)
    lease = await store.grant_lease(remaining)
    expire_time = records.now()
    expire_time.FromSeconds(int(expires_at))
    entry = identity_pb2.RevokedToken(token_id=token_id, expire_time=expire_time)

    async def body(txn: Txn) -> None:
        txn.put(paths.revoked(token_id), entry, lease=lease)

    await store.atomic(body)
