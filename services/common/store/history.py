"""Write history lookups that settle whether an ambiguously failed write was applied."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from aetcd import rpc

from services.common import errors
from services.common.store import client


async def first_change(conn: client.Connection, full: bytes, after: int) -> Any | None:
    """The first event on key `full` after revision `after`, or None if history is gone.

    Used after a write failed ambiguously (the member died with it in flight):
    the write was applied exactly when the first change after the revision it
    compared on is that write. Unlike the current value, this still holds
    after others have written the key since.
    """
    try:
        member = await conn.current()
        call = member.watch.Watch(metadata=client.REQUIRE_LEADER)
    except errors.NubisError:
        return None
    create = rpc.WatchCreateRequest(key=full, start_revision=after + 1)
    try:
        await call.write(rpc.WatchRequest(create_request=create))
        async with asyncio.timeout(conn.timeout):
            while True:
                response = await call.read()
                if response is grpc.aio.EOF or response.compact_revision or response.canceled:
                    return None
                if response.events:
                    return response.events[0]
    except (grpc.aio.AioRpcError, TimeoutError):
        return None
    finally:
        call.cancel()
