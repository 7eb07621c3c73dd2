"""Every node kept in weight order as the cache changes, and the best-first walk over it.

A spread or pack weight depends only on the node's free capacity, the
multipliers and a cluster-wide scale (weighers.py), never on the request. So
the node cache keeps every node ordered by it, moving one node at a time as
its usage, settings or report change, and a decision walks the nodes best
first, filtering as it goes, and stops once it holds the few best that pass.
Its cost then depends on how many nodes it has to skip, not on how many
nodes there are. The walk is exact: it returns what filtering and weighing
every node would, and a walk that finds too few has seen, and counted, every
node for the "no valid node" message.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping

from sortedcontainers import SortedList  # type: ignore[import-untyped]

from services.common.settings import SchedulerSettings
from services.scheduler import filters, model, weighers

# (-weight, tie-break, name): ascending order is best first. The tie-break is
# a random draw per node and change, so replicas facing a row of equally
# empty nodes each prefer different ones instead of racing for the same.
Key = tuple[float, float, str]

# The walk filters the order in stretches, the first this long, each next one
# twice as long up to the last: the list filters cost a little per call, and a
# walk whose first stretch passes is over.
_FIRST_STRETCH = 16
_LAST_STRETCH = 1024


class Ranking:
    """Every node by descending resource weight, best first."""

    def __init__(self, settings: SchedulerSettings, rng: random.Random) -> None:
        self._settings = settings
        self._rng = rng
        self._order: SortedList = SortedList()
        self._entries: dict[str, tuple[Key, model.NodeView]] = {}
        # Each class's usable amounts of every node (a multiset): the largest is the scale.
        self._usable: tuple[SortedList, SortedList, SortedList] = (
            SortedList(), SortedList(), SortedList())
        self._scale: model.Amounts = model.ZERO
        self._weights = weighers.coefficients(self._scale, settings)
        # A new scale changes every weight: the order is rebuilt once, when next read.
        self._stale = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def scale(self) -> model.Amounts:
        """The largest usable amount of each class among all nodes (see weighers.py)."""
        return self._scale

    def weight(self, view: model.NodeView) -> float:
        return weighers.resource_weight(view.free, self._weights)

    def put(self, view: model.NodeView) -> None:
        """Add a node, or move it to where its new view belongs."""
        held = self._entries.get(view.name)
        old_usable = held[1].usable if held is not None else None
        if held is not None and not self._stale:
            self._order.remove(held[0])
        if old_usable != view.usable:
            self._track(old_usable, view.usable)
        key = self._key(view)
        self._entries[view.name] = (key, view)
        if not self._stale:
            self._order.add(key)

    def remove(self, name: str) -> None:
        held = self._entries.pop(name, None)
        if held is None:
            return
        if not self._stale:
            self._order.remove(held[0])
        self._track(held[1].usable, None)

    def _key(self, view: model.NodeView) -> Key:
        return (-self.weight(view), self._rng.random(), view.name)

    def _track(self, old: model.Amounts | None, new: model.Amounts | None) -> None:
        for index, amounts in enumerate(self._usable):
            if old is not None:
                amounts.remove(old[index])
            if new is not None:
                amounts.add(new[index])
        scale = tuple(amounts[-1] if amounts else 0 for amounts in self._usable)
        if scale != self._scale:
            self._scale = (scale[0], scale[1], scale[2])
            self._weights = weighers.coefficients(self._scale, self._settings)
            self._stale = True
            self._order.clear()

    def _refresh(self) -> None:
        if not self._stale:
            return
        for name, (_, view) in self._entries.items():
            self._entries[name] = (self._key(view), view)
        self._order = SortedList(key for key, _ in self._entries.values())
        self._stale = False

    # -- the walk --------------------------------------------------------------

    def walk(
        self, demand: filters.Demand, wanted: int, busy: Collection[str] = (),
        planned: Mapping[str, model.NodeView] | None = None,
    ) -> filters.FilterResult:
        """The `wanted` best nodes that pass the filters for `demand`, best first.

        Nodes in `busy` (claims of this replica in flight there) count only
        when too few others pass, and then come last, as in weighers.best.
        `planned` replaces some nodes' views (earlier instances of the same
        request): those are judged apart and merged in by weight. With nothing
        passed, the result counts what each filter removed across every node.
        """
        self._refresh()
        active = filters.active_filters(demand)
        removed = {name: 0 for name, _ in active}
        planned = planned or {}
        extra = filters.apply(list(planned.values()), demand, active, removed)
        idle = [(self._key(view), view) for view in extra if view.name not in busy]
        spare = [(self._key(view), view) for view in extra if view.name in busy]
        considered, found = len(planned), 0
        for stretch in self._stretches(planned):
            considered += len(stretch)
            for view in filters.apply(stretch, demand, active, removed):
                entry = (self._entries[view.name][0], view)
                if view.name in busy:
                    spare.append(entry)
                else:
                    idle.append(entry)
                    found += 1
            if found >= wanted:
                break
        idle.sort(key=_first)
        spare.sort(key=_first)
        chosen = idle[:wanted] + spare[:max(0, wanted - len(idle))]
        return filters.FilterResult([view for _, view in chosen], removed, considered)

    def _stretches(self, skip: Mapping[str, model.NodeView]) -> Iterable[list[model.NodeView]]:
        """The nodes best first, in stretches of growing length, without those in `skip`."""
        entries, size, position = self._entries, _FIRST_STRETCH, 0
        while position < len(self._order):
            keys = self._order.islice(position, position + size)
            position += size
            yield [entries[key[2]][1] for key in keys if key[2] not in skip]
            size = min(size * 2, _LAST_STRETCH)


def _first(entry: tuple[Key, model.NodeView]) -> Key:
    return entry[0]
