"""The `world` fixture: identity in-process on a real etcd, with every kind of caller."""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator

import pytest

from services.client.channel import make_channel
from services.common.store import Store
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import authz
from tests.functional.authz import table
from tests.functional.authz.world import World, build_world, service_settings, stop_world, write_key

# Every rows_<service>.py module of this package adds its rows on import.
for _module in pkgutil.iter_modules(authz.__path__):
    if _module.name.startswith("rows_"):
        importlib.import_module(f"{authz.__name__}.{_module.name}")


@pytest.fixture(scope="package")
async def world(etcd: EtcdEndpoint, redis: RedisEndpoint,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = f"/test-authz-{uuid.uuid4().hex[:8]}"
    key_file = tmp_path_factory.mktemp("keys") / "signing.pem"
    key = write_key(key_file)
    settings = service_settings(etcd.endpoint, root, key_file, redis.url)
    store = await Store.connect([etcd.endpoint], root=root)
    built = await build_world(store, settings, key)
    for full_name, starter in table.SERVICES.items():
        service = await starter(built)
        built.services[full_name] = service
        built.channels[full_name] = make_channel(service.running.address)
    try:
        yield built
    finally:
        await stop_world(built)
        await store.close()
