"""Node liveness: keep ``nodes/<name>`` alive under an etcd lease while the agent runs.

It runs in its own thread with its own asyncio loop, beside the Celery worker.
An etcd outage (a member restart, a partition longer than the lease) only
makes it start over: grant a fresh lease and write the key again, so the node
comes back UP with the same name as soon as etcd is reachable. Anything else
that fails is a bug, not weather: the heartbeat ends with the error logged and
the agent stops, rather than retrying it forever.

The capacity in the report, and the storage pools it lists (sizes as
libvirt reports them after a refresh; the disk capacity is the node pool's
from the same reading), are read again from libvirt every
``agent.facts_interval`` seconds; a change (a resized, filled or stopped
pool) is written at once, on the same lease.

A node name belongs to one agent: a key held by another process's lease that
outlives that lease's remaining TTL (so it is being refreshed, not left by a
crashed predecessor) means a second agent was started with the same name, and
this one refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import threading
import time
from collections.abc import Callable

import structlog
from google.protobuf import timestamp_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.agent import dataplane
from services.agent import driver as driver_module
from services.common import errors, tasks
from services.common.settings import Settings
from services.common.store import Lease, Store, Txn

log = structlog.get_logger(__name__)


def _version() -> str:
    try:
        return importlib.metadata.version("nubis")
    except importlib.metadata.PackageNotFoundError:  # a checkout run without installing it
        return "0+unknown"


VERSION = _version()
"""nubis version the node reports, from the installed package's metadata."""

# Extra wait past a foreign lease's remaining TTL before calling its holder alive.
_TAKEOVER_MARGIN = 1.0


class DuplicateNode(Exception):
    """Another live agent holds this node's key."""


class KeyLost(Exception):
    """The node key vanished (its lease expired) or moved to another lease."""


# What the heartbeat outlives by starting over with a new lease: etcd out of
# reach or behind, a lost lease or key, an undecodable node key an operator can
# delete. Everything else (TypeError, AttributeError, ...) is a bug.
TRANSIENT = (errors.Unavailable, errors.NotFound, errors.Conflict, errors.FailedPrecondition,
             KeyLost, TimeoutError, OSError)

FactsReader = Callable[[], driver_module.HostFacts]


def node_key(name: str) -> str:
    return f"nodes/{name}"


def build_report(
    facts: driver_module.HostFacts, settings: Settings, name: str,
    start_time: timestamp_pb2.Timestamp | None = None,
) -> scheduler_pb2.NodeReport:
    """What the node tells the scheduler about itself (started now unless `start_time`)."""
    traits = {f"HW_ARCH_{facts.arch.upper()}", f"COMPUTE_HYPERVISOR_{facts.hypervisor_type}"}
    traits.update(settings.agent.traits)
    if start_time is None:
        start_time = timestamp_pb2.Timestamp()
        start_time.FromSeconds(int(time.time()))
    return scheduler_pb2.NodeReport(
        name=name,
        capacity=scheduler_pb2.Resources(
            vcpus=facts.vcpus, memory_mb=facts.memory_mb, disk_gb=facts.disk_gb
        ),
        hypervisor_type=facts.hypervisor_type,
        traits=sorted(traits),
        availability_zone=settings.agent.availability_zone,
        version=VERSION,
        queue=tasks.queue_name(name),
        libvirt_uri=settings.agent.libvirt_uri,
        hostname=facts.hostname,
        start_time=start_time,
        tunnel_address=settings.agent.tunnel_address,
        dataplane=dataplane.kind_for(settings.agent),
        network_node=settings.agent.network_node,
        pools=[_pool_report(pool) for pool in facts.pools],
        port_filter=settings.agent.port_filter,
    )


def _pool_report(pool: driver_module.storage.PoolInfo) -> scheduler_pb2.StoragePoolReport:
    return scheduler_pb2.StoragePoolReport(
        name=pool.name, path=pool.path, capacity_bytes=pool.capacity_bytes,
        allocation_bytes=pool.allocation_bytes, available_bytes=pool.available_bytes,
        active=pool.active, node_pool=pool.node_pool)


class Heartbeat:
    """Owns the node key's lease; start() spawns the thread, stop() revokes and joins."""

    def __init__(self, settings: Settings, report: scheduler_pb2.NodeReport,
                 read_facts: FactsReader) -> None:
        self._settings = settings
        self._report = report
        self._read_facts = read_facts
        self._ttl = settings.agent.lease_ttl
        self._thread = threading.Thread(target=self._main, name="node-heartbeat", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._own_leases: set[int] = set()
        self.published = threading.Event()
        self.refused = threading.Event()
        """Set when another live agent owns the node name; the heartbeat has ended."""
        self.crashed = threading.Event()
        """Set when the heartbeat ended on a bug (logged); the agent must stop."""
        self.on_ended: Callable[[], None] = lambda: None
        """Called from the heartbeat thread when it refuses or crashes after the start."""

    @property
    def report(self) -> scheduler_pb2.NodeReport:
        """The report last published (or about to be)."""
        return self._report

    def ended(self) -> bool:
        """True once the heartbeat stopped by itself (refused or crashed)."""
        return self.refused.is_set() or self.crashed.is_set()

    def wait_settled(self, timeout: float) -> bool:
        """Wait until the node is published or the heartbeat ended; False if neither in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.published.wait(0.1) or self.ended():
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
                self._end(self.refused, "node name already in use; not publishing", str(exc))
                break
            except TRANSIENT as exc:
                log.warning("heartbeat failed; retrying", node=self._report.name, error=str(exc))
                self.published.clear()
                await self._drop(store)
                store = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                backoff = min(backoff * 2, self._ttl / 3)
            except Exception:
                log.exception("heartbeat crashed; stopping the agent", node=self._report.name)
                self._end(self.crashed, "", "")
                break
        await self._shutdown(store, lease)

    async def _connect(self) -> Store:
        etcd = self._settings.etcd
        return await Store.connect(etcd.endpoints, root=etcd.prefix, timeout=etcd.timeout)

    async def _drop(self, store: Store | None) -> None:
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()

    def _end(self, event: threading.Event, message: str, reason: str) -> None:
        if message:
            log.error(message, node=self._report.name, reason=reason)
        self.published.clear()
        event.set()
        self.on_ended()

    async def _publish(self, store: Store, lease: Lease) -> None:
        key = node_key(self._report.name)

        async def body(txn: Txn) -> int:
            """0 once the key is ours; else the lease of the agent holding it."""
            current = await txn.get(key, scheduler_pb2.NodeReport)
            # A key on no lease was not written by an agent: ours to overwrite.
            if current is not None and current.lease and current.lease not in self._own_leases:
                return current.lease
            # A put moves the key onto the new lease, so an older lease of a
            # previous run of this process expiring later cannot delete it.
            txn.put(key, self._report, lease=lease)
            return 0

        watched, give_up = 0, 0.0
        while (holder := await store.atomic(body)) != 0:
            if self._stop is not None and self._stop.is_set():
                return
            if holder != watched:
                # A crashed predecessor's lease lapses within what it has left,
                # whatever TTL that agent was configured with. etcd rounds the
                # time left down to whole seconds: one more covers the fraction.
                left = await store.lease_time_to_live(holder)
                watched = holder
                give_up = time.monotonic() + max(left, 0) + 1 + _TAKEOVER_MARGIN
            elif time.monotonic() > give_up:
                raise DuplicateNode(f"{key} is held by lease {holder:x}, which another agent "
                                    "keeps refreshing")
            await asyncio.sleep(0.5)
        self.published.set()
        log.info("node published", node=self._report.name, lease=lease.id, ttl=self._ttl)

    async def _keep_alive(self, store: Store, lease: Lease) -> None:
        """Refresh the lease, re-reading capacity when due; raise when the lease or etcd is lost."""
        assert self._stop is not None
        interval = self._settings.agent.facts_interval
        tick = min(self._ttl / 3, interval)
        facts_due = time.monotonic() + interval
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), tick)
            if self._stop.is_set():
                return
            await asyncio.wait_for(store.refresh_lease(lease), self._ttl / 3)
            await self._check_key(store, lease)
            if time.monotonic() >= facts_due:
                facts_due = time.monotonic() + interval
                await self._refresh_facts(store, lease)

    async def _check_key(self, store: Store, lease: Lease) -> None:
        # A lease refreshed after it expired comes back with a TTL of 0 or an
        # error, and the key is gone: check the key is still ours.
        found = await store.find(node_key(self._report.name), scheduler_pb2.NodeReport)
        if found is None:
            raise KeyLost("node key vanished (lease expired)")
        if found.lease != lease.id:
            # Publishing again decides: wait out a lapsed holder, or refuse.
            raise KeyLost("node key is held by another lease")

    async def _refresh_facts(self, store: Store, lease: Lease) -> None:
        """Read capacity from libvirt again and publish the report if it changed."""
        try:
            facts = await asyncio.to_thread(self._read_facts)
        except errors.NubisError as exc:  # libvirt trouble: the last report stands
            log.warning("cannot re-read node facts", node=self._report.name, error=exc.message)
            return
        report = build_report(facts, self._settings, self._report.name, self._report.start_time)
        if report == self._report:
            return
        self._report = report
        await self._publish(store, lease)
        log.info("node report changed", node=report.name, vcpus=report.capacity.vcpus,
                 memory_mb=report.capacity.memory_mb, disk_gb=report.capacity.disk_gb)

    async def _shutdown(self, store: Store | None, lease: Lease | None) -> None:
        if store is None:
            return
        if lease is not None:
            with contextlib.suppress(Exception):
                await store.revoke_lease(lease)
        with contextlib.suppress(Exception):
            await store.close()
