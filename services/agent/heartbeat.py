"""Node liveness: keep ``nodes/<name>`` alive under an etcd lease while the agent runs.

It runs in its own thread with its own asyncio loop, beside the Celery worker.
Any etcd error (a member restart, a partition longer than the lease) only
makes it start over: grant a fresh lease and write the key again, so the node
comes back UP with the same name as soon as etcd is reachable.

A node name belongs to one agent: a key held by another process's lease that
outlives a full TTL (so it is refreshed, not left by a crashed predecessor)
means a second agent was started with the same name, and this one refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

import structlog
from google.protobuf import timestamp_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.agent import driver as driver_module
from services.common.settings import Settings
from services.common.store import Lease, Store, Txn

log = structlog.get_logger(__name__)

VERSION = "0.1.0"

# Extra wait past a foreign lease's TTL before calling its holder alive.
_TAKEOVER_MARGIN = 1.0


class DuplicateNode(Exception):
    """Another live agent holds this node's key."""


def node_key(name: str) -> str:
    return f"nodes/{name}"


def queue_name(name: str) -> str:
    """The Celery queue the node consumes."""
    return f"node.{name}"


def build_report(facts: driver_module.HostFacts, settings: Settings, name: str) -> (
    scheduler_pb2.NodeReport
):
    """What the node tells the scheduler about itself."""
    traits = {f"HW_ARCH_{facts.arch.upper()}", f"COMPUTE_HYPERVISOR_{facts.hypervisor_type}"}
    traits.update(settings.agent.traits)
    start = timestamp_pb2.Timestamp()
    start.FromSeconds(int(time.time()))
    return scheduler_pb2.NodeReport(
        name=name,
        capacity=scheduler_pb2.Resources(
            vcpus=facts.vcpus, memory_mb=facts.memory_mb, disk_gb=facts.disk_gb
        ),
        hypervisor_type=facts.hypervisor_type,
        traits=sorted(traits),
        availability_zone=settings.agent.availability_zone,
        version=VERSION,
        queue=queue_name(name),
        libvirt_uri=settings.agent.libvirt_uri,
        hostname=facts.hostname,
        start_time=start,
    )


class Heartbeat:
    """Owns the node key's lease; start() spawns the thread, stop() revokes and joins."""

    def __init__(self, settings: Settings, report: scheduler_pb2.NodeReport) -> None:
        self._settings = settings
        self._report = report
        self._ttl = settings.agent.lease_ttl
        self._thread = threading.Thread(target=self._main, name="node-heartbeat", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._own_leases: set[int] = set()
        self.published = threading.Event()
        self.refused = threading.Event()
        """Set when another live agent owns the node name; the heartbeat has ended."""
        self.on_refused: Callable[[], None] = lambda: None
        """Called from the heartbeat thread when it refuses after the start."""

    def wait_settled(self, timeout: float) -> bool:
        """Wait until the node is published or refused; False if neither within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.published.wait(0.1) or self.refused.is_set():
                return True
        return False

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Revoke the lease (the node goes DOWN at once) and end the thread."""
        if self._loop is not None and self._stop is not None:
            # The loop is closed if the heartbeat already ended (it refused).
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        store: Store | None = None
        lease: Lease | None = None
        backoff = 0.2
        while not self._stop.is_set():
            try:
                if store is None:
                    store = await self._connect()
                lease = await store.grant_lease(self._ttl)
                self._own_leases.add(lease.id)
                await self._publish(store, lease)
                backoff = 0.2
                await self._keep_alive(store, lease)
            except DuplicateNode as exc:
                self._refuse(str(exc))
                break
            except Exception as exc:  # any etcd trouble: start over with a new lease
                log.warning("heartbeat failed; retrying", node=self._report.name, error=str(exc))
                self.published.clear()
                if store is not None:
                    with contextlib.suppress(Exception):
                        await store.close()
                    store = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, self._ttl / 3)
        await self._shutdown(store, lease)

    async def _connect(self) -> Store:
        etcd = self._settings.etcd
        return await Store.connect(etcd.endpoints, root=etcd.prefix, timeout=etcd.timeout)

    def _refuse(self, reason: str) -> None:
        log.error("node name already in use; not publishing", node=self._report.name,
                  reason=reason)
        self.published.clear()
        self.refused.set()
        self.on_refused()

    async def _publish(self, store: Store, lease: Lease) -> None:
        key = node_key(self._report.name)
        foreign_since: float | None = None

        async def body(txn: Txn) -> bool:
            current = await txn.get(key, scheduler_pb2.NodeReport)
            if current is not None and current.lease not in self._own_leases:
                return False
            # A put moves the key onto the new lease, so an older lease of a
            # previous run of this process expiring later cannot delete it.
            txn.put(key, self._report, lease=lease)
            return True

        while not await store.atomic(body):
            if self._stop is not None and self._stop.is_set():
                return
            # Held by another process's lease: a crashed predecessor's lapses
            # within its TTL; one still held after that is a live duplicate.
            foreign_since = foreign_since or time.monotonic()
            if time.monotonic() - foreign_since > self._ttl + _TAKEOVER_MARGIN:
                raise DuplicateNode(f"{key} is held by another agent's lease")
            await asyncio.sleep(0.5)
        self.published.set()
        log.info("node published", node=self._report.name, lease=lease.id, ttl=self._ttl)

    async def _keep_alive(self, store: Store, lease: Lease) -> None:
        """Refresh every ttl/3 until stopped; raise when the lease or etcd is lost."""
        assert self._stop is not None
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._ttl / 3)
            if self._stop.is_set():
                return
            await asyncio.wait_for(store.refresh_lease(lease), self._ttl / 3)
            # A lease refreshed after it expired comes back with a TTL of 0 or
            # an error, and the key is gone: check the key is still ours.
            found = await store.find(node_key(self._report.name), scheduler_pb2.NodeReport)
            if found is None:
                raise LookupError("node key vanished (lease expired)")
            if found.lease != lease.id:
                # Publishing again decides: wait out a lapsed holder, or refuse.
                raise LookupError("node key is held by another lease")

    async def _shutdown(self, store: Store | None, lease: Lease | None) -> None:
        if store is None:
            return
        if lease is not None:
            with contextlib.suppress(Exception):
                await store.revoke_lease(lease)
        with contextlib.suppress(Exception):
            await store.close()
