"""Storage tasks: storage pools of the node (volumes come with the storage service)."""

from __future__ import annotations

import posixpath
import re
from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.driver import storage as storage_driver
from services.agent.tasks import phases
from services.common import errors, tasks

_POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class EnsurePool(phases.AgentTask[tasks_pb2.EnsurePoolRequest, tasks_pb2.EnsurePoolResponse]):
    """A `dir` pool exists and runs: defined and started if not, left alone if it does."""

    spec = tasks.ENSURE_POOL

    def __init__(self, driver: driver_module.Driver) -> None:
        self._storage = driver.storage

    def check_arguments(self, request: tasks_pb2.EnsurePoolRequest) -> None:
        problems = errors.ViolationCollector()
        if not _POOL_NAME.fullmatch(request.name):
            problems.add("name", "1-64 letters, digits, '.', '_' or '-', not first")
        if not posixpath.isabs(request.path) or posixpath.normpath(request.path) != request.path:
            problems.add("path", "must be a normalized absolute directory")
        problems.check(f"cannot ensure pool {request.name!r}")

    def lock_key(self, request: tasks_pb2.EnsurePoolRequest) -> str:
        return f"storage-pool/{request.name}"

    def check_prerequisites(self, request: tasks_pb2.EnsurePoolRequest,
                            ctx: phases.Context) -> tasks_pb2.EnsurePoolResponse | None:
        pool = self._storage.pool(request.name)
        if pool is None or not pool.active:
            return None
        return _response(pool, changed=False)

    def execute(self, request: tasks_pb2.EnsurePoolRequest,
                ctx: phases.Context) -> tasks_pb2.EnsurePoolResponse:
        if self._storage.pool(request.name) is None:
            self._storage.define_dir_pool(request.name, request.path)
        else:
            self._storage.start_pool(request.name)
        pool = self._storage.pool(request.name)
        if pool is None:
            raise errors.Unavailable(f"storage pool {request.name} vanished after it was made",
                                     reason="nubis.agent.libvirt_unavailable")
        return _response(pool, changed=True)


def _response(pool: storage_driver.PoolInfo, *, changed: bool) -> tasks_pb2.EnsurePoolResponse:
    return tasks_pb2.EnsurePoolResponse(name=pool.name, changed=changed,
                                        capacity_bytes=pool.capacity_bytes,
                                        available_bytes=pool.available_bytes)


def all_tasks(driver: driver_module.Driver) -> list[phases.AgentTask[Any, Any]]:
    return [EnsurePool(driver)]
