"""Fixtures of the functional tests that drive real node agents.

`agents` starts `nubis-agent` subprocesses on the session etcd and Redis
(under the test's key prefix) and stops every one at the end; `sender` is a
`TaskSender` on the same Redis, as a service holds one. A module needing other
agents' settings or a longer-lived sender defines its own of the same name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.common.task_sender import SenderConfig, TaskSender
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import agent_harness


@pytest.fixture
def agents(etcd: EtcdEndpoint, redis: RedisEndpoint, key_prefix: str,
           tmp_path: Path) -> Iterator[agent_harness.AgentLauncher]:
    yield from agent_harness.launcher(etcd, redis, key_prefix, tmp_path)


@pytest.fixture
async def sender(redis: RedisEndpoint) -> AsyncIterator[TaskSender]:
    started = await TaskSender.connect(SenderConfig(broker_url=redis.url, result_url=redis.url))
    try:
        yield started
    finally:
        await started.close()
