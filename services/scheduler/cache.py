"""The informer: an in-memory copy of every node's report, settings and usage.

It lists the three prefixes, then follows each with an etcd watch from the
listing's revision, so a decision never reads etcd. The copy may lag: claims
still compare on the usage, settings and report records their decision used
(see placement.py), and after a lost race the claimant feeds the fresh records
back (`observe_usage`, `observe_settings`, `observe_report`).
A watch whose start revision was compacted away makes the whole cache re-list.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog
from google.protobuf.message import Message
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors
from services.common.settings import SchedulerSettings
from services.common.store import Store, Versioned
from services.scheduler import keys, model, ranking

log = structlog.get_logger(__name__)

M = TypeVar("M", bound=Message)


class _Table(Generic[M]):
    """Latest known value and mod_revision of each key under one prefix."""

    def __init__(self, prefix: str, message_type: type[M]) -> None:
        self.prefix = prefix
        self.message_type = message_type
        self.items: dict[str, tuple[M, int]] = {}
        # Deletes are remembered by revision so a late put cannot resurrect a key.
        self.deleted: dict[str, int] = {}

    def revision_of(self, name: str) -> int:
        held = self.items.get(name)
        return held[1] if held is not None else self.deleted.get(name, 0)

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
        self.deleted[name] = revision
        return True

    def get(self, name: str) -> tuple[M, int] | None:
        return self.items.get(name)


class NodeCache:
    """Every node as a decision sees it, kept current by etcd watches."""

    def __init__(
        self, store: Store, defaults: SchedulerSettings, rng: random.Random | None = None
    ) -> None:
        self._store = store
        self._defaults = defaults
        self._reports = _Table(keys.NODE_REPORTS, scheduler_pb2.NodeReport)
        self._settings = _Table(keys.NODE_SETTINGS, scheduler_pb2.NodeSettings)
        self._usage = _Table(keys.NODE_USAGE, scheduler_pb2.NodeUsage)
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

    # -- feeding ---------------------------------------------------------

    def observe_usage(self, versioned: Versioned[scheduler_pb2.NodeUsage]) -> None:
        """A usage record read or written outside the watch (fresher than the cache)."""
        name = keys.name_of(versioned.key, keys.NODE_USAGE)
        if self._usage.put(name, versioned.value, versioned.mod_revision):
            self._rebuild(name)

    def observe_settings(self, versioned: Versioned[scheduler_pb2.NodeSettings]) -> None:
        name = keys.name_of(versioned.key, keys.NODE_SETTINGS)
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
            self._defaults,
            report_revision=report[1] if report else 0,
            settings_revision=settings[1] if settings else 0,
        )
        self._views[name] = view
        self.ranking.put(view)
        position = self._position.get(name)
        if self._snapshot is not None and position is not None:
            self._snapshot[position] = view
        else:
            self._snapshot = None

    # -- the informer loop ------------------------------------------------

    async def run(self) -> None:
        """List then watch, forever; re-list after compaction or a lost connection."""
        tables: list[_Table[Any]] = [self._reports, self._settings, self._usage]
        while True:
            try:
                revisions = [await self._list(table) for table in tables]
                self.synced.set()
                async with asyncio.TaskGroup() as group:
                    for table, revision in zip(tables, revisions, strict=True):
                        group.create_task(self._watch(table, revision + 1))
            except* errors.FailedPrecondition:
                log.info("watch start revision compacted; re-listing nodes")
            except* (errors.Unavailable, ConnectionError, OSError, TimeoutError) as failure:
                log.warning("node watch failed; re-listing", error=str(failure.exceptions[0]))
                await asyncio.sleep(0.5)

    async def _list(self, table: _Table[Any]) -> int:
        items, revision = await self._store.list_all(table.prefix, table.message_type)
        seen = set()
        for item in items:
            name = keys.name_of(item.key, table.prefix)
            seen.add(name)
            if table.put(name, item.value, item.mod_revision):
                self._changed(table, name)
        for name in [name for name in table.items if name not in seen]:
            if table.delete(name, revision):
                self._changed(table, name)
        return int(revision)

    async def _watch(self, table: _Table[Any], start_revision: int) -> None:
        events = self._store.watch(table.prefix, table.message_type, start_revision=start_revision)
        async for event in events:
            name = keys.name_of(event.key, table.prefix)
            if event.type == "put" and event.value is not None:
                applied = table.put(name, event.value, event.mod_revision)
            else:
                applied = table.delete(name, event.mod_revision)
            if applied:
                self._changed(table, name)

    def _changed(self, table: _Table[Any], name: str) -> None:
        self._rebuild(name)
        if table is self._reports and table.get(name) is not None:
            for callback in self.on_report:
                with contextlib.suppress(Exception):
                    callback(name)
