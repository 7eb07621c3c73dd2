"""Create idempotency: the request_id key written with the resource (DESIGN.md §3).

A Create carrying `request_id` reads ``requests/<project>/<request_id>`` in its
transaction and writes it with the resource. A retry finds the record and
returns what the first call made; two racing retries cannot both commit (the
loser's read of the absent key no longer holds, so its body runs again and
finds the winner's record). A different request under a used key is
ALREADY_EXISTS with reason ``nubis.request_id.reused``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from google.protobuf import message
from nubis.identity.v1 import identity_pb2

from services.common import errors
from services.common.context import Principal
from services.common.store import Lease, Store, Txn
from services.identity import paths, records

PREFIX = "requests/"
# Keys are remembered for a day: long past any client's retry window, and the
# lease makes etcd drop them without a sweeper.
TTL_SECONDS = 24 * 3600
# The store's reason for a value that is not the message type it was read as.
UNDECODABLE = "nubis.store.undecodable"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


@dataclass
class Idempotency:
    """One Create's request_id: where it is recorded and what it records."""

    key: str
    record: identity_pb2.RequestRecord
    lease: Lease


def key(project_id: str, request_id: str) -> str:
    return f"{PREFIX}{project_id or paths.CLOUD_SCOPE}/{request_id}"


def fingerprint(request: message.Message, *, secrets: tuple[str, ...] = ()) -> str:
    """SHA-256 of the request without request_id and `secrets` (never fast-hash a password)."""
    copy = type(request)()
    copy.CopyFrom(request)
    for name in ("request_id", *secrets):
        copy.ClearField(name)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


async def prepare(
    store: Store, principal: Principal | None, request: message.Message, request_id: str, *,
    secrets: tuple[str, ...] = (),
) -> Idempotency | None:
    """The request_id's record to check and write, or None without a key to keep."""
    if not request_id:
        return None
    if not _REQUEST_ID.fullmatch(request_id):
        raise errors.InvalidArgument(
            "request_id must be 1-128 letters, digits or _.:- (a UUID is best)",
            violations=[errors.FieldViolation("request_id", "1-128 of [A-Za-z0-9_.:-]")],
        )
    project_id = principal.project_id if principal is not None else ""
    record = identity_pb2.RequestRecord(
        method=request.DESCRIPTOR.full_name,
        fingerprint=fingerprint(request, secrets=secrets),
        create_time=records.now(),
    )
    return Idempotency(key(project_id, request_id), record, await store.grant_lease(TTL_SECONDS))


async def replayed(txn: Txn, idempotency: Idempotency | None) -> str:
    """Inside the create transaction: the id an identical earlier request made, else ""."""
    if idempotency is None:
        return ""
    try:
        found = await txn.get(idempotency.key, identity_pb2.RequestRecord)
    except errors.FailedPrecondition as exc:
        if exc.reason != UNDECODABLE:
            raise
        # Every service keeps its request ids under requests/<project>/: this
        # one is another service's record, so the id was used for another request.
        raise _reused(idempotency) from None
    if found is None:
        return ""
    earlier = found.value
    if (earlier.method, earlier.fingerprint) != (
        idempotency.record.method, idempotency.record.fingerprint
    ):
        raise _reused(idempotency)
    return earlier.resource_id


def _reused(idempotency: Idempotency) -> errors.AlreadyExists:
    return errors.AlreadyExists(
        "request_id was already used for a different request",
        reason="nubis.request_id.reused",
        metadata={"request_id": idempotency.key.rsplit("/", 1)[-1]},
    )


def remember(txn: Txn, idempotency: Idempotency | None, resource_id: str) -> None:
    """Inside the create transaction: record what this request made."""
    if idempotency is None:
        return
    idempotency.record.resource_id = resource_id
    txn.put(idempotency.key, idempotency.record, lease=idempotency.lease)
