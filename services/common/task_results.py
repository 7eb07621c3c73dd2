"""Task outcomes read from Celery's Redis result backend with redis.asyncio, never blocking.

When a worker stores a task's state it SETs ``celery-task-meta-<id>`` and
PUBLISHes the same value on a channel of that name (STARTED, then SUCCESS,
FAILURE or REVOKED). One pubsub connection serves every task in flight, with
one pattern subscription made before the first task is sent: the ids of this
waiter's tasks all begin with its own random tag (`new_task_id`), so the
pattern ``celery-task-meta-<tag>-*`` hears every outcome of them and none of
another process's. A task costs no SUBSCRIBE and UNSUBSCRIBE round trips of
its own, and no wait for Redis to confirm one before the task may be sent. A
result published while that connection was being re-established is read back
from the key.
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
# Most seconds Redis may take to confirm the pattern subscription.
_CONFIRM_TIMEOUT = 10.0
_TRANSPORT_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@dataclass
class Pending:
    """One task whose outcome is awaited."""

    task_id: str
    channel: str
    done: asyncio.Future[dict[str, Any]]
    started: bool = False
    """Set once the agent reported STARTED: the task reached a worker."""


class ResultWaiter:
    """Awaits Celery task outcomes read through `client`; `start` before use, `close` after."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._pubsub = client.pubsub()
        # The first group of a UUID's text: the ids stay UUIDs, unique by their other 96 bits.
        self.tag = uuid.uuid4().hex[:8]
        self._pending: dict[str, Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    async def start(self) -> None:
        """Open the pubsub connection; Unavailable if Redis cannot be reached."""
        try:
            async with asyncio.timeout(_CONFIRM_TIMEOUT):
                await self._pubsub.psubscribe(f"{KEY_PREFIX}{self.tag}-*")
                # Confirmed before any task is sent, so no outcome can come unheard.
                while (message := await self._pubsub.get_message(timeout=_CONFIRM_TIMEOUT)) \
                        is None or message["type"] != "psubscribe":
                    pass
        except (TimeoutError, *_TRANSPORT_ERRORS) as exc:
            raise errors.Unavailable(f"cannot reach the task result store: {exc!r}",
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

    def new_task_id(self) -> str:
        """A fresh task id whose outcome this waiter hears (a UUID beginning with its tag)."""
        return f"{self.tag}{str(uuid.uuid4())[8:]}"

    def expect(self, task_id: str) -> Pending:
        """Follow the outcome of `task_id` (one of `new_task_id`), before the task is sent."""
        if self._failure is not None:
            raise errors.Unavailable(f"task results are not being read: {self._failure}",
                                     reason="nubis.agent.results_unavailable")
        if not task_id.startswith(self.tag):
            raise ValueError(f"task id {task_id} is not one of this waiter's")
        channel = KEY_PREFIX + task_id
        pending = Pending(task_id, channel, asyncio.get_running_loop().create_future())
        self._pending[channel] = pending
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

    def forget(self, pending: Pending) -> None:
        """Stop following the task (done, or its caller gave up)."""
        if self._pending.pop(pending.channel, None) is not None and not pending.done.done():
            pending.done.cancel()

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
        if pending is not None and message["type"] == "pmessage":
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
