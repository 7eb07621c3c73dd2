"""Create idempotency for every service: the request_id key written with the resource.

A Create carrying `request_id` reads ``requests/<project>/<request_id>``
(DESIGN.md §3) in its transaction and writes it with the resource, as a
``nubis.common.v1.RequestRecord``. A retry finds the record and returns what
the first call made; two racing retries cannot both commit (the loser's read
of the absent key no longer holds, so its body runs again and finds the
winner's record). Every service shares the key space, so a key already used
for a different request — other fields, another method, another service — is
ALREADY_EXISTS with reason ``nubis.request_id.reused``.

Use, inside one domain function::

    idempotency = requests.prepare(store, project_id, METHOD, request, request.request_id,
                                   validate_only=request.validate_only)

    async def body(txn):
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        ...  # checks and writes of the resource
        await requests.remember(txn, idempotency, resource_id)
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

from google.protobuf import descriptor, message, timestamp_pb2
from nubis.common.v1 import request_pb2

from services.common import errors, resources
from services.common.store import Store, Txn

PREFIX = "requests/"
# Keys are remembered for a day: long past any client's retry window, and the
# lease makes etcd drop them without a sweeper.
TTL_SECONDS = 24 * 3600
# Records share the lease of the hour their day ends in (Store.shared_lease): a
# record lives a day to a day and an hour, and a process holds ~25 such leases
# however many requests it serves.
LEASE_BUCKET_SECONDS = 3600
REUSED = "nubis.request_id.reused"
# The store's reason for a value that is not the message type it was read as.
_UNDECODABLE = "nubis.store.undecodable"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


@dataclass
class Idempotency:
    """One Create's request_id: where it is recorded and what it records."""

    store: Store
    key: str
    request_id: str
    record: request_pb2.RequestRecord


def key(project_id: str, request_id: str) -> str:
    """Where the record of `request_id` in `project_id` ("" = cloud scope) lives."""
    return resources.scoped(PREFIX, project_id, request_id)


def fingerprint(request: message.Message, *, secrets: tuple[str, ...] = ()) -> str:
    """SHA-256 (hex) of `request` without request_id and the `secrets` fields.

    Secrets are field paths (``password``, ``spec.admin_pass``): a fast hash of
    a password stored for a day would be an offline guessing oracle.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    for path in ("request_id", *secrets):
        _clear(copy, path)
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _clear(msg: message.Message, path: str) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        if not msg.HasField(parent):
            return
        msg = getattr(msg, parent)
    msg.ClearField(name)


def check_request_id(request_id: str) -> None:
    """A request_id becomes a key segment: 1-128 of ``[A-Za-z0-9_.:-]``, alphanumeric first."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise errors.InvalidArgument(
            "request_id must be 1-128 letters, digits or _.:- (a UUID is best)",
            violations=[errors.FieldViolation("request_id", "1-128 of [A-Za-z0-9_.:-]")],
        )


def prepare(
    store: Store, project_id: str, method: descriptor.MethodDescriptor,
    request: message.Message, request_id: str, *, secrets: tuple[str, ...] = (),
    validate_only: bool = False,
) -> Idempotency | None:
    """The record to check and write for `request_id`, or None when there is none.

    `project_id` scopes the key (the project the caller acts in, "" for cloud
    scope); `method` is the RPC serving `request`; `secrets` name fields left
    out of the fingerprint. A malformed request_id is INVALID_ARGUMENT, also
    in a dry run (`validate_only`), which records nothing and replays nothing.
    """
    if not request_id:
        return None
    check_request_id(request_id)
    if validate_only:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    record = request_pb2.RequestRecord(
        method=method.full_name, fingerprint=fingerprint(request, secrets=secrets),
        create_time=stamp,
    )
    return Idempotency(store, key(project_id, request_id), request_id, record)


async def replayed(txn: Txn, idempotency: Idempotency | None) -> str:
    """Inside the create transaction: the id an identical earlier request made, else ""."""
    if idempotency is None:
        return ""
    try:
        found = await txn.get(idempotency.key, request_pb2.RequestRecord)
    except errors.FailedPrecondition as exc:
        if exc.reason != _UNDECODABLE:
            raise
        # Not a record of this format (one written before every service shared
        # it): whatever it was, the key was used for another request.
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
        reason=REUSED, metadata={"request_id": idempotency.request_id},
    )


async def remember(txn: Txn, idempotency: Idempotency | None, resource_id: str) -> None:
    """Inside the create transaction: record what this request made, for a day.

    The record goes under the lease this process shares for the hour its day
    ends in; asked for here, inside the body, so a commit that finds the lease
    gone runs the body again with a fresh one.
    """
    if idempotency is None:
        return
    lease = await idempotency.store.shared_lease(time.time() + TTL_SECONDS,
                                                 width=LEASE_BUCKET_SECONDS)
    idempotency.record.resource_id = resource_id
    txn.put(idempotency.key, idempotency.record, lease=lease)
