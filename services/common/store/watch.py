"""Watching a prefix from a revision: every change in order, none twice, across failovers.

Each `watch` call owns one etcd Watch stream. It remembers the revision after
the last batch it delivered; when the member dies or loses its leader the
stream is reopened on the next member from that revision, so the caller sees
no gap and no repeat. A start revision etcd has compacted away raises
FailedPrecondition(reason="nubis.store.compacted"): the caller re-lists.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from aetcd import rpc

from services.common import errors
from services.common.store import client, keys, kv
from services.common.store.types import M, WatchEvent

COMPACTED = "nubis.store.compacted"


def _compacted(prefix: str, revision: int, compact_revision: int) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"cannot watch {prefix!r} from revision {revision}: "
        f"history before {compact_revision} was compacted; list again",
        reason=COMPACTED,
        metadata={"compact_revision": str(compact_revision)},
    )


class _StreamLost(Exception):
    """The stream ended in a way that a reopen on another member can repair."""


def _check_start(start_revision: object) -> int:
    if not isinstance(start_revision, int) or isinstance(start_revision, bool) \
            or start_revision < 0:
        raise errors.InvalidArgument(
            f"start_revision must be an integer >= 0, not {start_revision!r}",
            violations=[errors.FieldViolation("start_revision", "must be an integer >= 0")],
        )
    return start_revision


@dataclass
class _Cursor:
    """Where the next stream must start so that nothing is missed or repeated."""

    next_revision: int
    opened: bool = False


async def _open(member: client.Member, full: bytes, cursor: _Cursor, wait: float) -> Any:
    """Open a Watch stream from the cursor and wait (up to `wait` s) for etcd to confirm it."""
    call = member.watch.Watch(metadata=client.REQUIRE_LEADER)
    create = rpc.WatchCreateRequest(
        key=full,
        range_end=keys.range_end(full),
        start_revision=cursor.next_revision,
        progress_notify=True,
    )
    try:
        await call.write(rpc.WatchRequest(create_request=create))
        created = await asyncio.wait_for(call.read(), wait)
    except BaseException:
        call.cancel()
        raise
    cursor.opened = True
    return call, created


async def _stream(
    member: client.Member,
    ks: keys.Keyspace,
    full: bytes,
    msg_type: type[M],
    cursor: _Cursor,
    wait: float,
    on_undecodable: kv.Undecodable | None,
) -> AsyncIterator[WatchEvent[M]]:
    """The events of one Watch stream; the cursor advances after each delivered batch."""
    call, response = await _open(member, full, cursor, wait)
    try:
        while True:
            if response is grpc.aio.EOF:
                raise _StreamLost("stream closed by etcd")
            if response.compact_revision:
                raise _compacted(ks.relative(full), cursor.next_revision,
                                 response.compact_revision)
            if response.canceled:
                raise _StreamLost(response.cancel_reason or "watch canceled by etcd")
            if response.events:
                for event in response.events:
                    decoded = _event(ks, msg_type, event, on_undecodable)
                    if decoded is not None:
                        yield decoded
                cursor.next_revision = response.events[-1].kv.mod_revision + 1
            elif not response.created and response.header.revision >= cursor.next_revision:
                # A progress notification: nothing happened up to that revision.
                cursor.next_revision = response.header.revision + 1
            response = await call.read()
    finally:
        call.cancel()


async def watch(
    conn: client.Connection,
    ks: keys.Keyspace,
    prefix: str,
    msg_type: type[M],
    start_revision: int,
    on_undecodable: kv.Undecodable | None = None,
) -> AsyncIterator[WatchEvent[M]]:
    """Yield every change under `prefix` from `start_revision` (0: from now) on.

    A put whose value is not a `msg_type` fails the watch, or, given
    `on_undecodable`, is reported to it (key, mod_revision) and skipped.
    """
    full = ks.prefix(prefix)
    cursor = _Cursor(_check_start(start_revision))
    loop = asyncio.get_running_loop()
    failures, lost_since = 0, 0.0
    while True:
        member = await conn.current()
        try:
            async for event in _stream(member, ks, full, msg_type, cursor, conn.timeout,
                                       on_undecodable):
                yield event
        except (grpc.aio.AioRpcError, _StreamLost, TimeoutError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and not client.is_retryable(exc):
                raise client.translate(exc) from None
            failures = 1 if cursor.opened else failures + 1
            lost_since = loop.time() if failures == 1 else lost_since
            cursor.opened = False
            conn.failover(member, f"watch: {exc}")
            if loop.time() - lost_since > conn.timeout:
                raise errors.Unavailable(
                    f"watch of {prefix!r} lost and could not be resumed: {exc}",
                    reason="nubis.store.unavailable",
                ) from None
            if failures >= 2:
                await asyncio.sleep(client.retry_delay(failures))


def _event(
    ks: keys.Keyspace, msg_type: type[M], event: Any, on_undecodable: kv.Undecodable | None
) -> WatchEvent[M] | None:
    key = ks.relative(event.kv.key)
    if event.type == rpc.Event.DELETE:
        return WatchEvent("delete", key, None, event.kv.mod_revision)
    if on_undecodable is None:
        return WatchEvent("put", key, kv.decode(msg_type, event.kv.value, key),
                          event.kv.mod_revision)
    try:
        value = kv.decode(msg_type, event.kv.value, key)
    except errors.FailedPrecondition:
        on_undecodable(key, event.kv.mod_revision)
        return None
    return WatchEvent("put", key, value, event.kv.mod_revision)

