"""The informer: an in-memory copy of every node's report, settings and usage.

With them it holds the cloud's default allocation ratios (ratios.py), which
every node's usable capacity is computed with. It lists the four prefixes,
then follows each with an etcd watch from the listing's revision, so a
decision never reads etcd. The copy may lag: claims still compare on the
usage, settings, report and ratio records their decision used
(see placement.py), and after a lost race the claimant feeds the fresh records
back (`observe_usage`, `observe_settings`, `observe_report`).

The loop runs supervised (services.common.supervise): a watch broken by an
etcd outage backs off and resumes from the last revision seen; only a resume
from a revision etcd has compacted away re-lists; a crash is logged, re-lists
and restarts. An undecodable record is logged and dropped, never re-listed for.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog
from google.protobuf.message import Message
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, resources, supervise
from services.common.settings import SchedulerSettings
from services.common.store import COMPACTED, Store, Versioned
from services.scheduler import keys, model, ranking

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)

# How long a deleted key is remembered. A read made outside the watch (a
# claim's fresh read) lands within seconds; past this a tombstone only costs memory.
TOMBSTONE_SECONDS = 60.0


class _Table(Generic[M]):
    """Latest known value and mod_revision of each key under one prefix."""

    def __init__(self, prefix: str, message_type: type[M], tombstone_seconds: float) -> None:
        self.prefix = prefix
        self.message_type = message_type
        self.items: dict[str, tuple[M, int]] = {}
        # Deletes are remembered by revision (oldest first) so a late put, read
        # before the delete, cannot resurrect a key; pruned after tombstone_seconds.
        self.deleted: dict[str, tuple[int, float]] = {}
        self.tombstone_seconds = tombstone_seconds
        # Everything up to this revision has been applied: a watch resumes after it.
        self.revision = 0

    def revision_of(self, name: str) -> int:
        held = self.items.get(name)
        if held is not None:
            return held[1]
        tombstone = self.deleted.get(name)
        return tombstone[0] if tombstone is not None else 0

    def put(self, name: str, value: M, revision: int) -> bool:
        if revision < self.revision_of(name):
            return False
        self.items[name] = (value, revision)
        self.deleted.pop(name, None)
        return True

    def delete(self, name: str, revision: int) -> bool:
        if revision < self.revision_of(name):
            return False
        self.items.pop(name, None)
        self.deleted.pop(name, None)  # re-inserted last, keeping the oldest first
        self.deleted[name] = (revision, time.monotonic())
        self.prune()
        return True

    def prune(self) -> None:
        """Forget tombstones older than tombstone_seconds."""
        horizon = time.monotonic() - self.tombstone_seconds
        while self.deleted:
            name, (_, deleted_at) = next(iter(self.deleted.items()))
            if deleted_at > horizon:
                return
            del self.deleted[name]

    def get(self, name: str) -> tuple[M, int] | None:
        return self.items.get(name)


class NodeCache:
    """Every node as a decision sees it, kept current by etcd watches."""

    def __init__(
        self, store: Store, defaults: SchedulerSettings, rng: random.Random | None = None, *,
        restart_policy: supervise.RestartPolicy | None = None,
        tombstone_seconds: float = TOMBSTONE_SECONDS,
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._reports = _Table(keys.NODE_REPORTS, scheduler_pb2.NodeReport, tombstone_seconds)
        self._settings = _Table(keys.NODE_SETTINGS, scheduler_pb2.NodeSettings,
                                tombstone_seconds)
        self._usage = _Table(keys.NODE_USAGE, scheduler_pb2.NodeUsage, tombstone_seconds)
        self._ratios = _Table(keys.DEFAULT_RATIOS, scheduler_pb2.DefaultAllocationRatios,
                              tombstone_seconds)
        # The cloud's default ratios (all three set) every view is computed with.
        self._default_ratios = model.default_ratios(None)
        self._restart_policy = restart_policy or supervise.RestartPolicy()
        self._must_list = True
        self.supervision = supervise.Stats()
        self.listings = 0
        """Full listings so far (the first one included)."""
        self.undecodable = 0
        """Records skipped because they did not decode."""
        self._views: dict[str, model.NodeView] = {}
        self._snapshot: list[model.NodeView] | None = None
        self._position: dict[str, int] = {}
        # Every node in weight order, moved as each one changes (see ranking.py).
        self.ranking = ranking.Ranking(defaults, rng or random.Random())
        self.synced = asyncio.Event()
        # Called with a node name whenever its report appears or changes.
        self.on_report: list[Callable[[str], None]] = []

    # -- reading ---------------------------------------------------------

    def views(self) -> list[model.NodeView]:
        """Every known node, in no particular order.

        The list is patched in place when a node changes rather than rebuilt:
        at 10,000 nodes a rebuild after every claim would cost more than the
        decision itself. Callers use it synchronously and never keep it.
        """
        if self._snapshot is None:
            self._snapshot = list(self._views.values())
            self._position = {view.name: index for index, view in enumerate(self._snapshot)}
        return self._snapshot

    def view(self, name: str) -> model.NodeView | None:
        return self._views.get(name)

    def report(self, name: str) -> scheduler_pb2.NodeReport | None:
        held = self._reports.get(name)
        return held[0] if held is not None else None

    def settings(self, name: str) -> tuple[scheduler_pb2.NodeSettings, int] | None:
        return self._settings.get(name)

    def usage(self, name: str) -> tuple[scheduler_pb2.NodeUsage, int] | None:
        """The node's usage record and its mod_revision, as last seen (None: none seen)."""
        return self._usage.get(name)

    def ratio_record(self) -> tuple[scheduler_pb2.DefaultAllocationRatios | None, int]:
        """The cloud's default-ratios record and its mod_revision (None, 0: none seen)."""
        held = self._ratios.get(keys.CLOUD_RATIOS)
        return (held[0], held[1]) if held is not None else (None, 0)

    def default_ratios(self) -> scheduler_pb2.AllocationRatios:
        """The cloud's default ratios, all three set (built-in ones without a record)."""
        return self._default_ratios

    # -- feeding ---------------------------------------------------------

    def observe_usage(self, versioned: Versioned[scheduler_pb2.NodeUsage]) -> None:
        """A usage record read or written outside the watch (fresher than the cache)."""
        name = resources.name_of(versioned.key, keys.NODE_USAGE)
        if self._usage.put(name, versioned.value, versioned.mod_revision):
            self._rebuild(name)

    def observe_ratios(self, versioned: Versioned[scheduler_pb2.DefaultAllocationRatios]) -> None:
        """The default-ratios record read or written outside the watch."""
        name = resources.name_of(versioned.key, keys.DEFAULT_RATIOS)
        if self._ratios.put(name, versioned.value, versioned.mod_revision):
            self._changed(self._ratios, name)

    def observe_settings(self, versioned: Versioned[scheduler_pb2.NodeSettings]) -> None:
        name = resources.name_of(versioned.key, keys.NODE_SETTINGS)
        if self._settings.put(name, versioned.value, versioned.mod_revision):
            self._rebuild(name)

    def observe_report(
        self, name: str, versioned: Versioned[scheduler_pb2.NodeReport] | None,
        absent_after: int = 0,
    ) -> None:
        """A report read outside the watch; None: the key was found absent.

        An absent key is known gone only since some revision after
        `absent_after` (the revision of the report the reader had before), so
        a report the watch already delivered past that stays.
        """
        if versioned is None:
            applied = self._reports.delete(name, absent_after + 1)
        else:
            applied = self._reports.put(name, versioned.value, versioned.mod_revision)
        if applied:
            self._changed(self._reports, name)

    def _rebuild(self, name: str) -> None:
        report = self._reports.get(name)
        settings = self._settings.get(name)
        usage = self._usage.get(name)
        if report is None and settings is None and usage is None:
            self._views.pop(name, None)
            self.ranking.remove(name)
            self._snapshot = None
            return
        view = model.make_view(
            model.NodeName(name),
            report[0] if report else None,
            settings[0] if settings else None,
            usage[0] if usage else None,
            usage[1] if usage else 0,
            self._default_ratios,
            report_revision=report[1] if report else 0,
            settings_revision=settings[1] if settings else 0,
            ratios_revision=self.ratio_record()[1],
        )
        self._views[name] = view
        self.ranking.put(view)
        position = self._position.get(name)
        if self._snapshot is not None and position is not None:
            self._snapshot[position] = view
        else:
            self._snapshot = None

    # -- the informer loop ------------------------------------------------

    def tombstones(self) -> int:
        """Deleted keys still remembered (pruned after the tombstone time)."""
        return sum(len(table.deleted) for table in self._tables())

    def _tables(self) -> list[_Table[Any]]:
        # The ratios first: a listing then computes each node's capacity once.
        return [self._ratios, self._reports, self._settings, self._usage]

    async def run(self) -> None:
        """List, then watch from the listing's revision, forever, under a supervisor."""
        await supervise.supervise("node-informer", self._session, self._restart_policy,
                                  self.supervision)

    async def _session(self) -> None:
        """Watch until a failure; re-list first when needed and after a compaction."""
        try:
            while True:
                if self._must_list:
                    await self._list_all()
                try:
                    await self._watch_all()
                except errors.FailedPrecondition as exc:
                    if exc.reason != COMPACTED:
                        raise
                    log.info("node watch resumed past compacted history; re-listing")
                    self._must_list = True
        except self._restart_policy.transient:
            raise  # resumed from the last revision seen once etcd answers again
        except Exception:
            # The failure may have come half-way through an update: start from a listing.
            self._must_list = True
            raise

    async def _list_all(self) -> None:
        for table in self._tables():
            table.revision = await self._list(table)
            table.prune()
        self._must_list = False
        self.listings += 1
        self.synced.set()

    async def _list(self, table: _Table[Any]) -> int:
        items, revision = await self._store.list_all(
            table.prefix, table.message_type, on_undecodable=self._skipper(table, listing=True)
        )
        seen = set()
        for item in items:
            name = resources.name_of(item.key, table.prefix)
            seen.add(name)
            if table.put(name, item.value, item.mod_revision):
                self._changed(table, name)
        for name in [name for name in table.items if name not in seen]:
            if table.delete(name, revision):
                self._changed(table, name)
        return int(revision)

    async def _watch_all(self) -> None:
        """Follow every table until one watch fails, and raise that failure."""
        tasks = [asyncio.create_task(self._watch(table)) for table in self._tables()]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, table: _Table[Any]) -> None:
        events = self._store.watch(
            table.prefix, table.message_type, start_revision=table.revision + 1,
            on_undecodable=self._skipper(table, listing=False),
        )
        async for event in events:
            name = resources.name_of(event.key, table.prefix)
            if event.type == "put" and event.value is not None:
                applied = table.put(name, event.value, event.mod_revision)
            else:
                applied = table.delete(name, event.mod_revision)
            table.revision = event.mod_revision
            if applied:
                self._changed(table, name)

    def _skipper(self, table: _Table[Any], *, listing: bool) -> Callable[[str, int], None]:
        """What to do with a record that does not decode: log it and treat it as absent."""

        def skip(key: str, revision: int) -> None:
            self.undecodable += 1
            log.warning("undecodable node record skipped", key=key, mod_revision=revision,
                        expected=table.message_type.DESCRIPTOR.full_name)
            # A listing leaves it out (so it is absent there); a watched put drops
            # the value the key held before, so both paths agree.
            if listing:
                return
            name = resources.name_of(key, table.prefix)
            table.revision = max(table.revision, revision)
            if table.delete(name, revision):
                self._changed(table, name)

        return skip

    def _changed(self, table: _Table[Any], name: str) -> None:
        if table is self._ratios:
            self._ratios_changed()
            return
        self._rebuild(name)
        if table is self._reports and table.get(name) is not None:
            for callback in self.on_report:
                try:
                    callback(name)
                except Exception:
                    # One listener's bug must not stop the cache nor the other listeners.
                    log.exception("node report listener failed", node=name)

    def _ratios_changed(self) -> None:
        """New default ratios: every node's usable capacity follows."""
        self._default_ratios = model.default_ratios(self.ratio_record()[0])
        for name in list(self._views):
            self._rebuild(name)
