"""Task outcomes read from Celery's Redis result backend with redis.asyncio, never blocking.

When a worker stores a task's state it SETs ``celery-task-meta-<id>`` and
PUBLISHes the same value on a channel of that name (STARTED, then SUCCESS,
FAILURE or REVOKED). One pubsub connection serves every task in flight: the
waiter subscribes to a task's channel, and waits for Redis to confirm, before
the task is published, so its outcome cannot be missed. A result published
while that connection was being re-established is read back from the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions
import structlog

from services.common import errors

log = structlog.get_logger(__name__)

KEY_PREFIX = "celery-task-meta-"
"""Prefix of Celery's result keys and channels (celery.backends.base.KeyValueStoreBackend)."""
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
"""Celery states after which a task's state never changes again."""

# Between checks of the result key while a task runs long: covers an outcome
# published while the pubsub connection was down, at the cost of one GET.
_POLL_INTERVAL = 5.0
_TRANSPORT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@dataclass
class Pending:
    """One task whose outcome is awaited."""

    task_id: str
    channel: str
    subscribed: asyncio.Future[None]
    done: asyncio.Future[dict[str, Any]]
    started: bool = False
    """Set once the agent reported STARTED: the task reached a worker."""


class ResultWaiter:
    """Awaits Celery task outcomes read through `client`; `start` before use, `close` after."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._pubsub = client.pubsub()
        self._pending: dict[str, Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def start(self) -> None:
        """Open the pubsub connection; Unavailable if Redis cannot be reached."""
        try:
            # A channel of our own keeps the connection subscribed (and so
            # readable) while no task is in flight.
            await self._pubsub.subscribe(f"nubis-task-waiter-{uuid.uuid4()}")
        except _TRANSPORT_ERRORS as exc:
            raise errors.Unavailable(f"cannot reach the task result store: {exc}",
                                     reason="nubis.agent.results_unavailable") from exc
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="task-results")
        self._reader.add_done_callback(self._reader_ended)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis-py 8
        await self.client.aclose()

    async def expect(self, task_id: str, within: float) -> Pending:
        """Subscribe to the outcome of `task_id`; returns once Redis confirmed it."""
        if self._failure is not None:
            raise errors.Unavailable(f"task results are not being read: {self._failure}",
                                     reason="nubis.agent.results_unavailable")
        loop = asyncio.get_running_loop()
        channel = KEY_PREFIX + task_id
        pending = Pending(task_id, channel, loop.create_future(), loop.create_future())
        self._pending[channel] = pending
        try:
            async with asyncio.timeout(within):
                await self._pubsub.subscribe(channel)
                await pending.subscribed
        except (TimeoutError, *_TRANSPORT_ERRORS) as exc:
            await self.forget(pending)
            raise errors.Unavailable(f"cannot subscribe to task results: {exc!r}",
                                     reason="nubis.agent.results_unavailable") from exc
        return pending

    async def outcome(self, pending: Pending, within: float) -> dict[str, Any] | None:
        """The final state of the task (Celery's result meta), or None after `within` seconds."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + within
        while (left := ends - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(pending.done),
                                              min(left, _POLL_INTERVAL))
            await self._check_key(pending)
        return pending.done.result() if pending.done.done() else None

    async def forget(self, pending: Pending) -> None:
        """Stop following the task (done, or its caller gave up)."""
        if self._pending.pop(pending.channel, None) is None:
            return
        if not pending.done.done():
            pending.done.cancel()
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            await self._pubsub.unsubscribe(pending.channel)

    async def _read(self) -> None:
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except _TRANSPORT_ERRORS as exc:
                log.warning("task results connection lost; reconnecting", error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                await self._resync()
                continue
            backoff = 0.1
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        pending = self._pending.get(name)
        if pending is None:
            return
        if message["type"] == "subscribe":
            if not pending.subscribed.done():
                pending.subscribed.set_result(None)
        elif message["type"] == "message":
            self._record(pending, message["data"])

    def _record(self, pending: Pending, data: bytes | str) -> None:
        try:
            meta = json.loads(data)
            status = meta["status"]
        except (ValueError, TypeError, KeyError):
            log.warning("undecodable task result; ignored", task_id=pending.task_id)
            return
        if status == "STARTED":
            pending.started = True
        elif status in READY_STATES and not pending.done.done():
            pending.done.set_result(meta)

    async def _check_key(self, pending: Pending) -> None:
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            data = await self.client.get(pending.channel)
            if data is not None:
                self._record(pending, data)

    async def _resync(self) -> None:
        """After a reconnect: read back the outcomes published while we were away."""
        for pending in list(self._pending.values()):
            await self._check_key(pending)

    def _reader_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        failure = task.exception()
        log.error("task results reader crashed", error=repr(failure), exc_info=failure)
        self._failure = failure
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.set_exception(errors.Unavailable(
                    f"task results are not being read: {failure!r}",
                    reason="nubis.agent.results_unavailable"))
