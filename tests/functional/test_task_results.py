"""Outcomes heard through one pattern subscription per waiter, on a real Redis.

Outcomes are published here the way Celery's Redis backend stores them (SET
the key, PUBLISH the same value on the channel of that name), so the test
needs no worker: each waiter hears its own tasks' outcomes and never another
waiter's, and an outcome published while nobody listened is read from its key.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aredis

from services.common.task_results import KEY_PREFIX, ResultWaiter
from tests.conftest import RedisEndpoint


@pytest.fixture
async def client(redis: RedisEndpoint) -> AsyncIterator[aredis.Redis]:
    made = aredis.Redis.from_url(redis.url)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
async def waiters(redis: RedisEndpoint) -> AsyncIterator[tuple[ResultWaiter, ResultWaiter]]:
    pair = (ResultWaiter(aredis.Redis.from_url(redis.url)),
            ResultWaiter(aredis.Redis.from_url(redis.url)))
    for waiter in pair:
        await waiter.start()
    try:
        yield pair
    finally:
        for waiter in pair:
            await waiter.close()


async def _store(client: aredis.Redis, task_id: str, status: str, *,
                 publish: bool = True) -> None:
    """What a worker's result backend does for one state of the task."""
    meta = json.dumps({"task_id": task_id, "status": status, "result": {"response": {}}})
    await client.set(KEY_PREFIX + task_id, meta)
    if publish:
        await client.publish(KEY_PREFIX + task_id, meta)


async def test_each_waiter_hears_its_own_outcomes_only(
        client: aredis.Redis, waiters: tuple[ResultWaiter, ResultWaiter]) -> None:
    first, second = waiters
    assert first.tag != second.tag
    mine, theirs = first.new_task_id(), second.new_task_id()
    assert str(uuid.UUID(mine)) == mine and mine.startswith(first.tag)
    heard, other = first.expect(mine), second.expect(theirs)

    await _store(client, mine, "STARTED")
    await _store(client, mine, "SUCCESS")
    meta = await first.outcome(heard, 5.0)

    assert meta is not None and meta["status"] == "SUCCESS" and heard.started
    assert not other.done.done() and not other.started
    first.forget(heard)
    second.forget(other)
    assert other.done.cancelled()


async def test_an_outcome_published_unheard_is_read_from_its_key(
        client: aredis.Redis, waiters: tuple[ResultWaiter, ResultWaiter]) -> None:
    first, _ = waiters
    task_id = first.new_task_id()
    pending = first.expect(task_id)
    await _store(client, task_id, "SUCCESS", publish=False)

    await first._check_key(pending)

    assert (await asyncio.wait_for(pending.done, 1.0))["status"] == "SUCCESS"


async def test_a_task_id_not_made_by_the_waiter_is_refused(
        waiters: tuple[ResultWaiter, ResultWaiter]) -> None:
    first, second = waiters
    with pytest.raises(ValueError, match="not one of this waiter's"):
        first.expect(second.new_task_id())
