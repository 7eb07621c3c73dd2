"""An operation cancelled between its commit and its start is run by its own replica."""

from __future__ import annotations

import asyncio

from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import operation_pb2

from services.common.settings import StorageSettings
from services.common.store import Store
from services.storage import keys, operation

Operation = operation_pb2.Operation


class _Recorder:
    """A handler that finishes at once, remembering which operations it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def run(self, runner: operation.Runner, op: Operation) -> None:
        self.ran.append(op.id)
        await runner.store.delete(keys.operation(op.resource_id))

    async def fail(self, runner: operation.Runner, op: Operation,
                   fault: resource_pb2.Fault) -> None:
        raise AssertionError(f"{op.id} failed: {fault.message}")


async def _record(store: Store, runner: operation.Runner, resource_id: str,
                  age_seconds: int) -> Operation:
    op = await runner.new(Operation.CREATE_VOLUME, resource_id, "p", "node-1")
    op.update_time.seconds -= age_seconds
    await store.create(keys.operation(resource_id), op)
    return op


async def test_a_stranded_operation_of_this_replica_is_run_once(store: Store) -> None:
    settings = StorageSettings(operation_scan_interval=1.0, operation_lease_ttl=5)
    runner = operation.Runner(store, sender=None, clients=None,  # type: ignore[arg-type]
                              config=settings)
    recorder = _Recorder()
    runner.register(Operation.CREATE_VOLUME, recorder)
    try:
        stranded = await _record(store, runner, "vol-stranded", age_seconds=30)
        # Committed "now" for the whole test: scans run every second, and one older than a
        # scan would rightly count as stranded before the test's last look.
        fresh = await _record(store, runner, "vol-fresh", age_seconds=-60)
        assert await runner.adopt_orphans() == 0  # its own: restarted, not adopted
        for _ in range(50):
            if recorder.ran:
                break
            await asyncio.sleep(0.05)
        assert recorder.ran == [stranded.id]  # a just-committed one is left to its request
        assert await store.find(keys.operation("vol-stranded"), Operation) is None
        assert await store.find(keys.operation("vol-fresh"), Operation) is not None
        await runner.adopt_orphans()
        await asyncio.sleep(0.2)
        assert recorder.ran == [stranded.id]
        assert fresh.id not in recorder.ran
    finally:
        await runner.stop()
