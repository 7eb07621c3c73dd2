"""What one replica's port creates share: turns at the quota commit and known records.

Every port create of a project changes that project's quota usage record.
So that a replica's concurrent creates in one project do not keep losing
that compare to each other, each takes the project's turn (`Turns`) for the
last stretch of its transaction (reading the usage, then the commit).

A create also reads records that rarely change: its network, the network's
subnets, its security groups and the project's quota limits. `Records` keeps
them as last read, with their mod_revision, and a create assumes them
(`Txn.assume`) instead of reading them again. The commit compares each one's
mod_revision as for a read, so an entry gone stale (a network updated or
deleted, a rule added to a group, a quota changed) costs that transaction one
rerun on the fresh values, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message
from nubis.identity.v1 import identity_pb2

from services.common.context import Principal
from services.common.settings import NetworkSettings
from services.common.store import Store, Txn
from services.network import ipam

# Entries `Records` keeps before it starts over (networks, subnets, groups, quotas).
_RECORDS_KEPT = 4096
Wanted = Sequence[tuple[str, type[Message]]]


@dataclass
class Records:
    """Rarely changing records as a replica's creates last read them (see the module doc)."""

    known: dict[str, tuple[Message | None, int]] = field(default_factory=dict)

    async def read(self, txn: Txn, wanted: Wanted) -> None:
        """Give `txn` every record of `wanted`: assumed when known, the rest read at once."""
        missing = []
        for key, kind in wanted:
            entry = self.known.get(key)
            if entry is None:
                missing.append((key, kind))
            else:
                txn.assume(key, entry[0], entry[1])
        await txn.get_many(missing)
        if len(self.known) + len(missing) > _RECORDS_KEPT:
            self.known.clear()
        for key, kind in wanted:
            found = await txn.get(key, kind)
            self.known[key] = (found.value, found.mod_revision) if found is not None \
                else (None, 0)


@dataclass
class Turns:
    """Per-project turns at the quota commit, within one replica, and its known records."""

    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _waiting: dict[str, int] = field(default_factory=dict)
    # What this replica's last commit in a project left: its usage record and revision.
    # The next create assumes it instead of reading it; if another replica wrote it
    # since, that commit loses its compare once and runs again on the fresh value.
    usage: dict[str, tuple[identity_pb2.Usage, int]] = field(default_factory=dict)
    # Projects whose default security group is known to exist (it cannot be deleted).
    defaults_known: set[str] = field(default_factory=set)
    # Addresses this replica's creates are trying, and what its last subnet scans left.
    ipam_hints: ipam.Hints = field(default_factory=ipam.Hints)
    records: Records = field(default_factory=Records)

    @contextlib.asynccontextmanager
    async def taking(self) -> AsyncIterator[_Turn]:
        turn = _Turn(self)
        try:
            yield turn
        finally:
            turn.release()

    async def _acquire(self, project_id: str) -> None:
        self._waiting[project_id] = self._waiting.get(project_id, 0) + 1
        await self._locks.setdefault(project_id, asyncio.Lock()).acquire()

    def _release(self, project_id: str) -> None:
        self._locks[project_id].release()
        self._waiting[project_id] -= 1
        if not self._waiting[project_id]:
            del self._waiting[project_id], self._locks[project_id]


@dataclass
class _Turn:
    """One transaction's turn: taken once, kept across its reruns, released after it."""

    turns: Turns
    held: str | None = None

    async def take(self, project_id: str) -> None:
        if self.held is None:
            await self.turns._acquire(project_id)
            self.held = project_id

    def release(self) -> None:
        if self.held is not None:
            self.turns._release(self.held)
            self.held = None



@dataclass(frozen=True)
class Creation:
    """What one port create needs besides the request: where it runs and for whom."""

    store: Store
    settings: NetworkSettings
    turns: Turns
    principal: Principal | None
    project_id: str
