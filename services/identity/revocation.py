"""Writing revocations: single token ids, every older token of a user or project, or of a
user in one project.

Entries share time-bucketed leases (Store.shared_lease) that end a little after
the tokens they block would have expired anyway, so the revocation lists every
service keeps in memory stay small, and etcd's leases stay few however many
tokens are revoked.
"""

from __future__ import annotations

import time

from nubis.identity.v1 import identity_pb2

from services.common import resources
from services.common.store import Store, Txn
from services.identity import keys

# Extra lifetime past the longest token, so clock skew between hosts cannot
# let a revoked token outlive its revocation entry.
_MARGIN = 60
# Entries whose deadlines fall in the same five minutes share one lease.
BUCKET_SECONDS = 300


def subject_ttl(token_ttl: int) -> int:
    """Lifetime of a user/project revocation: as long as any older token can live."""
    return token_ttl + _MARGIN


async def revoke_subject(
    store: Store, txn: Txn, kind: str, subject_id: str, *, token_ttl: int, project_id: str = "",
) -> None:
    """In `txn`: every token of the user/project issued until now is revoked.

    With `project_id` (kind "user"): only the user's tokens scoped to that
    project, as when a role there is taken away.
    """
    lease = await store.shared_lease(time.time() + subject_ttl(token_ttl), width=BUCKET_SECONDS)
    txn.put(
        keys.revoked_subject(kind, subject_id, project_id),
        identity_pb2.RevokedSubject(kind=kind, id=subject_id, revoke_time=resources.now(),
                                    project_id=project_id),
        lease=lease,
    )


async def revoke_token(store: Store, token_id: str, expires_at: float) -> None:
    """Revoke one token id until it would have expired (idempotent)."""
    expire_time = resources.now()
    expire_time.FromSeconds(int(expires_at))
    entry = identity_pb2.RevokedToken(token_id=token_id, expire_time=expire_time)

    async def body(txn: Txn) -> None:
        lease = await store.shared_lease(expires_at + _MARGIN, width=BUCKET_SECONDS)
        txn.put(keys.revoked(token_id), entry, lease=lease)

    await store.atomic(body)
