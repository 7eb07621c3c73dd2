"""Single-key reads and writes: get, list, create-if-absent, compare-and-swap, delete.

Every write is one etcd transaction whose failure branch reads the key back,
so a lost compare costs no extra round trip: the fresh value comes with the
answer. When an earlier attempt of the same write failed in a way that may
have applied it (the member died after receiving it), a failed compare whose
fresh value equals what we wrote is our own success, not a conflict.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aetcd import rpc
from google.protobuf.message import DecodeError, Message

from services.common import errors
from services.common.store import client, history, keys
from services.common.store.types import M, Page, Versioned

MAX_PAGE_SIZE = 1000
"""Largest page one list call returns; bigger requests are clamped."""

Undecodable = Callable[[str, int], None]
"""Told the key and mod_revision of a stored value that is not the expected message."""


def decode(msg_type: type[M], data: bytes, key: str) -> M:
    """Parse a stored value; FailedPrecondition if it is not a `msg_type`."""
    try:
        return msg_type.FromString(data)
    except DecodeError:
        raise errors.FailedPrecondition(
            f"stored value of {key!r} is not a {msg_type.__name__}",
            reason="nubis.store.undecodable",
            metadata={"key": key},
        ) from None


def encode(msg: object, key: str) -> bytes:
    """Serialize a message; InvalidArgument for anything that is not a protobuf message."""
    if not isinstance(msg, Message):
        raise errors.InvalidArgument(
            f"value of {key!r} must be a protobuf message, not {type(msg).__name__}",
            violations=[errors.FieldViolation("value", "must be a protobuf message")],
        )
    return msg.SerializeToString()


# Requests are filled in place (``request.compare.add()``): building sub-messages first
# and passing them as constructor arguments copies each one, ~4 us per transaction.
_MOD, _EQUAL = rpc.Compare.MOD, rpc.Compare.EQUAL


def add_compare_mod(request: Any, full: bytes, mod_revision: int) -> None:
    """Compare: the key was last written at `mod_revision` (0: the key is absent)."""
    compare = request.compare.add()
    compare.key = full
    compare.target = _MOD
    compare.result = _EQUAL
    compare.mod_revision = mod_revision


def add_read(ops: Any, full: bytes) -> None:
    """Append a read of `full` to `ops` (a success or failure branch)."""
    ops.add().request_range.key = full


def add_put(
    ops: Any, full: bytes, data: bytes, *, lease: int = 0, keep_lease: bool = False,
    prev_kv: bool = False,
) -> None:
    """Append a put of `data` at `full` to `ops`."""
    put = ops.add().request_put
    put.key = full
    put.value = data
    put.lease = lease
    put.ignore_lease = keep_lease
    put.prev_kv = prev_kv


def add_delete(ops: Any, full: bytes) -> None:
    """Append a delete of `full` to `ops`."""
    ops.add().request_delete_range.key = full


def key_txn(full: bytes, mod_revision: int | None) -> Any:
    """A transaction on one key: compare its mod_revision (unless None); on failure read it."""
    request = rpc.TxnRequest()
    if mod_revision is not None:
        add_compare_mod(request, full, mod_revision)
    add_read(request.failure, full)
    return request


async def range_request(conn: client.Connection, request: Any) -> Any:
    response, _ = await conn.unary(client.KV_RANGE, request)
    return response


async def txn_request(conn: client.Connection, request: Any) -> tuple[Any, bool]:
    """Commit a transaction; also says whether an earlier attempt may have applied it."""
    return await conn.unary(client.KV_TXN, request)


def failure_kv(response: Any, index: int = 0) -> Any | None:
    """The key-value the failure branch's `index`-th read returned, or None if absent."""
    kvs = response.responses[index].response_range.kvs
    return kvs[0] if kvs else None


async def conflict_pause(attempt: int) -> None:
    """Short jittered pause after a lost compare, so racing writers spread out."""
    await asyncio.sleep(client.retry_delay(attempt, base=0.002, cap=0.05))


async def compact(conn: client.Connection, revision: int) -> None:
    request = rpc.CompactionRequest(revision=_check_revision(revision), physical=True)
    await conn.unary(client.KV_COMPACT, request)


async def applied_revision(
    conn: client.Connection, full: bytes, compared: int, data: bytes
) -> int:
    """The revision at which our put of `data` (compared on `compared`) landed, or 0."""
    event = await history.first_change(conn, full, compared)
    if event is None:
        # History compacted: the current value is the best evidence left.
        now = (await range_request(conn, rpc.RangeRequest(key=full))).kvs
        return int(now[0].mod_revision) if now and now[0].value == data else 0
    if event.type == rpc.Event.PUT and event.kv.value == data:
        return int(event.kv.mod_revision)
    return 0


async def find(
    conn: client.Connection, ks: keys.Keyspace, key: str, msg_type: type[M]
) -> Versioned[M] | None:
    response, _ = await conn.unary(client.KV_RANGE, rpc.RangeRequest(key=ks.key(key)))
    if not response.kvs:
        return None
    kv = response.kvs[0]
    return Versioned(key, decode(msg_type, kv.value, key), kv.mod_revision, kv.create_revision,
                     kv.lease)


async def get(
    conn: client.Connection, ks: keys.Keyspace, key: str, msg_type: type[M]
) -> Versioned[M]:
    # Not `find` plus a None check: the hottest call of all saves a coroutine that way.
    response, _ = await conn.unary(client.KV_RANGE, rpc.RangeRequest(key=ks.key(key)))
    if not response.kvs:
        raise errors.NotFound(f"{key} not found", metadata={"key": key})
    kv = response.kvs[0]
    return Versioned(key, decode(msg_type, kv.value, key), kv.mod_revision, kv.create_revision)


def _page_size(page_size: object) -> int:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise errors.InvalidArgument(
            f"page_size must be a positive integer, not {page_size!r}",
            violations=[errors.FieldViolation("page_size", "must be a positive integer")],
        )
    return min(page_size, MAX_PAGE_SIZE)


async def list_page(
    conn: client.Connection,
    ks: keys.Keyspace,
    prefix: str,
    msg_type: type[M],
    page_size: int,
    page_token: str,
    on_undecodable: Undecodable | None = None,
) -> Page[M]:
    """One page of the keys under `prefix`, every page read at the first page's revision.

    With `on_undecodable`, a value that is not a `msg_type` is reported to it
    (key, mod_revision) and left out instead of failing the whole page.
    """
    start = ks.prefix(prefix)
    limit = _page_size(page_size)
    revision, first = 0, start
    if page_token:
        revision, last_key = keys.decode_page_token(page_token, start)
        first = last_key + b"\x00"
    request = rpc.RangeRequest(
        key=first, range_end=keys.range_end(start), limit=limit, revision=revision
    )
    try:
        response = await range_request(conn, request)
    except errors.FailedPrecondition as exc:
        if exc.reason != "nubis.store.compacted" or not revision:
            raise
        # The snapshot of the first page is gone: carry on after the cursor at the
        # latest revision, which still returns every key at most once and in order.
        request.revision = revision = 0
        response = await range_request(conn, request)
    revision = revision or response.header.revision
    if on_undecodable is None:
        items = [
            Versioned(rel, decode(msg_type, kv.value, rel), kv.mod_revision, kv.create_revision)
            for kv in response.kvs
            for rel in (ks.relative(kv.key),)
        ]
    else:
        items = _decodable(ks, msg_type, response.kvs, on_undecodable)
    token = keys.encode_page_token(revision, response.kvs[-1].key) if response.more else ""
    return Page(items=items, next_page_token=token, revision=revision)


def _decodable(
    ks: keys.Keyspace, msg_type: type[M], kvs: Any, on_undecodable: Undecodable
) -> list[Versioned[M]]:
    """The values of `kvs` that decode; each other one is reported and left out."""
    items: list[Versioned[M]] = []
    for kv in kvs:
        rel = ks.relative(kv.key)
        try:
            value = decode(msg_type, kv.value, rel)
        except errors.FailedPrecondition:
            on_undecodable(rel, kv.mod_revision)
            continue
        items.append(Versioned(rel, value, kv.mod_revision, kv.create_revision))
    return items


async def list_all(
    conn: client.Connection, ks: keys.Keyspace, prefix: str, msg_type: type[M],
    on_undecodable: Undecodable | None = None,
) -> tuple[list[Versioned[M]], int]:
    """Every value under `prefix` at one revision, and that revision."""
    items: list[Versioned[M]] = []
    token = ""
    while True:
        page = await list_page(conn, ks, prefix, msg_type, MAX_PAGE_SIZE, token, on_undecodable)
        items.extend(page.items)
        token = page.next_page_token
        if not token:
            return items, page.revision


async def list_at(
    conn: client.Connection, ks: keys.Keyspace, prefix: str, msg_type: type[M], revision: int
) -> list[Versioned[M]]:
    """Every value under `prefix` as it was at `revision`; FailedPrecondition
    ``nubis.store.compacted`` once etcd no longer holds that revision."""
    # A cursor placed before the first key makes the first page read at `revision`.
    token = keys.encode_page_token(revision, ks.prefix(prefix))
    items: list[Versioned[M]] = []
    while True:
        page = await list_page(conn, ks, prefix, msg_type, MAX_PAGE_SIZE, token)
        if page.revision != revision:  # the listing fell back to the latest: `revision` is gone
            raise errors.FailedPrecondition(
                f"cannot read {prefix!r} at revision {revision}: that history was compacted; "
                "list again", reason="nubis.store.compacted",
                metadata={"revision": str(revision)})
        items.extend(page.items)
        token = page.next_page_token
        if not token:
            return items


async def create(
    conn: client.Connection, ks: keys.Keyspace, key: str, msg: M, lease_id: int = 0
) -> Versioned[M]:
    full = ks.key(key)
    data = encode(msg, key)
    request = key_txn(full, 0)
    add_put(request.success, full, data, lease=lease_id)
    response, maybe_applied = await txn_request(conn, request)
    revision = response.header.revision
    if response.succeeded:
        return Versioned(key, msg, revision, revision)
    existing = failure_kv(response)
    if maybe_applied and existing is not None and existing.lease == lease_id:
        # Did an attempt that "failed" when the member died in fact create the key?
        # Compare what was written at the key's creation, not what it holds now.
        first = await range_request(
            conn, rpc.RangeRequest(key=full, revision=existing.create_revision)
        )
        if first.kvs and first.kvs[0].value == data:
            return Versioned(key, msg, first.kvs[0].mod_revision, existing.create_revision)
    raise errors.AlreadyExists(f"{key} already exists", metadata={"key": key})


async def update(
    conn: client.Connection,
    ks: keys.Keyspace,
    key: str,
    msg_type: type[M],
    mutate: Callable[[M], M | None],
    retries: int,
) -> Versioned[M]:
    """Read-modify-write with a compare on mod_revision; `retries` more tries on conflict."""
    full = ks.key(key)
    kv = (await range_request(conn, rpc.RangeRequest(key=full))).kvs
    current = kv[0] if kv else None
    for attempt in range(retries + 1):
        if current is None:
            raise errors.NotFound(f"{key} not found", metadata={"key": key})
        message = decode(msg_type, current.value, key)
        changed = mutate(message)
        new = message if changed is None else changed
        data = encode(new, key)
        if data == current.value:
            return Versioned(key, new, current.mod_revision, current.create_revision)
        request = key_txn(full, current.mod_revision)
        add_put(request.success, full, data, keep_lease=current.lease != 0)
        response, maybe_applied = await txn_request(conn, request)
        if response.succeeded:
            return Versioned(key, new, response.header.revision, current.create_revision)
        fresh = failure_kv(response)
        if maybe_applied and fresh is not None:
            mine = await applied_revision(conn, full, current.mod_revision, data)
            if mine:
                return Versioned(key, new, mine, current.create_revision)
        current = fresh
        if attempt < retries:
            await conflict_pause(attempt)
    raise errors.Conflict(
        f"{key} kept changing: gave up after {retries + 1} attempts", metadata={"key": key}
    )


def _check_revision(expect_revision: object) -> int:
    if not isinstance(expect_revision, int) or isinstance(expect_revision, bool) \
            or expect_revision < 1:
        raise errors.InvalidArgument(
            f"expect_revision must be a positive integer, not {expect_revision!r}",
            violations=[errors.FieldViolation("revision", "must be a positive integer")],
        )
    return expect_revision


async def replace(
    conn: client.Connection, ks: keys.Keyspace, key: str, msg: M, expect_revision: int
) -> Versioned[M]:
    full = ks.key(key)
    revision = _check_revision(expect_revision)
    data = encode(msg, key)
    request = key_txn(full, revision)
    # The compare proves the key exists, so its lease (if any) can be kept.
    add_put(request.success, full, data, keep_lease=True, prev_kv=True)
    response, maybe_applied = await txn_request(conn, request)
    if response.succeeded:
        return Versioned(key, msg, response.header.revision, _created(response, revision))
    fresh = failure_kv(response)
    if fresh is None:
        raise errors.NotFound(f"{key} not found", metadata={"key": key})
    mine = await applied_revision(conn, full, revision, data) if maybe_applied else 0
    if mine:
        return Versioned(key, msg, mine, fresh.create_revision)
    raise errors.Conflict(
        f"{key} changed: expected revision {revision}, found {fresh.mod_revision}",
        metadata={"key": key, "expected": str(revision), "actual": str(fresh.mod_revision)},
    )


def _created(response: Any, fallback: int) -> int:
    prev = response.responses[0].response_put.prev_kv
    return int(prev.create_revision) if prev.create_revision else fallback


async def delete(
    conn: client.Connection, ks: keys.Keyspace, key: str, expect_revision: int | None
) -> None:
    full = ks.key(key)
    compared = None if expect_revision is None else _check_revision(expect_revision)
    request = key_txn(full, compared)
    add_delete(request.success, full)
    response, maybe_applied = await txn_request(conn, request)
    if response.succeeded:
        if response.responses[0].response_delete_range.deleted or maybe_applied:
            return
        raise errors.NotFound(f"{key} not found", metadata={"key": key})
    fresh = failure_kv(response)
    if fresh is None:
        if maybe_applied:
            return
        raise errors.NotFound(f"{key} not found", metadata={"key": key})
    raise errors.Conflict(
        f"{key} changed: expected revision {expect_revision}, found {fresh.mod_revision}",
        metadata={"key": key, "expected": str(expect_revision),
                  "actual": str(fresh.mod_revision)},
    )
