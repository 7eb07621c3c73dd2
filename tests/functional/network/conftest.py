"""The network tests' cloud: one per package (identity, scheduler, network; agents on demand)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.network.harness import NetCloud, start_cloud, stop_cloud


@pytest.fixture(scope="package")
async def cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NetCloud]:
    made = await start_cloud(etcd, redis, f"/test-network-{uuid.uuid4().hex[:8]}",
                             tmp_path_factory.mktemp("network"))
    try:
        yield made
    finally:
        await stop_cloud(made)
