"""Filters: which nodes can take one instance (pure; Nova's filter scheduler, simplified).

Each filter is a predicate on a `NodeView` and a `Demand`. Only the filters a
request needs are run, in a fixed order, and the first one that rejects a node
is charged with it, so "no valid node" can say how many nodes each removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from nubis.scheduler.v1 import scheduler_pb2

from services.scheduler import model

Policy = scheduler_pb2.ServerGroupPolicy


@dataclass(frozen=True)
class Demand:
    """What one instance needs, with the state of its server group."""

    resources: model.Amounts
    required_traits: frozenset[str] = frozenset()
    forbidden_traits: frozenset[str] = frozenset()
    availability_zone: str = ""
    hypervisor_type: str = ""
    avoid_nodes: frozenset[str] = frozenset()
    group_policy: int = Policy.SERVER_GROUP_POLICY_UNSPECIFIED
    # Node name -> how many members of the group run there.
    group_nodes: Mapping[str, int] = field(default_factory=dict)


# A filter takes the nodes still in the running and returns those it keeps.
# Filters work on whole lists (comprehensions) because a decision may look at
# ten thousand nodes, where a Python call per node and filter would dominate.
Filter = Callable[[list[model.NodeView], Demand], list[model.NodeView]]


def _compute(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    return [node for node in nodes if node.up and node.enabled]


def _avoid(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    avoid = demand.avoid_nodes
    return [node for node in nodes if node.name not in avoid]


def _capacity(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    vcpus, memory_mb, disk_gb = demand.resources
    return [
        node for node in nodes
        if node.free[0] >= vcpus and node.free[1] >= memory_mb and node.free[2] >= disk_gb
    ]


def _traits(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    required, forbidden = demand.required_traits, demand.forbidden_traits
    return [node for node in nodes
            if required <= node.traits and not (forbidden & node.traits)]


def _zone(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    return [node for node in nodes if node.availability_zone == demand.availability_zone]


def _hypervisor(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    wanted = demand.hypervisor_type.lower()
    return [node for node in nodes if node.hypervisor_type.lower() == wanted]


def _affinity(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    # The first member may go anywhere; the rest follow it.
    if not demand.group_nodes:
        return nodes
    return [node for node in nodes if node.name in demand.group_nodes]


def _anti_affinity(nodes: list[model.NodeView], demand: Demand) -> list[model.NodeView]:
    return [node for node in nodes if node.name not in demand.group_nodes]


def active_filters(demand: Demand) -> list[tuple[str, Filter]]:
    """The filters this demand needs, cheapest and most selective first."""
    chosen: list[tuple[str, Filter]] = [("ComputeFilter", _compute)]
    if demand.avoid_nodes:
        chosen.append(("AvoidNodesFilter", _avoid))
    if demand.availability_zone:
        chosen.append(("AvailabilityZoneFilter", _zone))
    if demand.hypervisor_type:
        chosen.append(("HypervisorTypeFilter", _hypervisor))
    if demand.required_traits or demand.forbidden_traits:
        chosen.append(("TraitsFilter", _traits))
    if demand.group_policy == Policy.AFFINITY:
        chosen.append(("ServerGroupAffinityFilter", _affinity))
    elif demand.group_policy == Policy.ANTI_AFFINITY:
        chosen.append(("ServerGroupAntiAffinityFilter", _anti_affinity))
    chosen.append(("CapacityFilter", _capacity))
    return chosen


@dataclass
class FilterResult:
    """Nodes that passed, and how many nodes each filter removed."""

    passed: list[model.NodeView]
    removed: dict[str, int]
    considered: int

    def explain(self) -> str:
        """'3 nodes: ComputeFilter removed 1, CapacityFilter removed 2'."""
        parts = [f"{name} removed {count}" for name, count in self.removed.items() if count]
        return f"{self.considered} nodes considered: " + (", ".join(parts) or "none left")


def run(
    nodes: Iterable[model.NodeView], demand: Demand, *, limit: int = 0, start: int = 0
) -> FilterResult:
    """Apply the active filters in turn; each is charged with the nodes it removed.

    With a `limit` smaller than the node list, the list is scanned in chunks
    from `start` (wrapping around) and the scan stops once `limit` nodes have
    passed: the weighers only look at a sample that large anyway, and at
    10,000 nodes filtering all of them would cost more than the rest of the
    decision. A scan that finds too few goes on to the end, so "no valid node"
    still counts every node.
    """
    remaining = nodes if isinstance(nodes, list) else list(nodes)
    total = len(remaining)
    if not limit or total <= limit:
        return _filter(remaining, demand, active_filters(demand), {}, total)
    active = active_filters(demand)
    removed: dict[str, int] = {}
    passed: list[model.NodeView] = []
    chunk = max(_MIN_CHUNK, limit // 4)
    scanned = 0
    while scanned < total and len(passed) < limit:
        lower = (start + scanned) % total
        size = min(chunk, total - scanned)
        part = remaining[lower:lower + size]
        if len(part) < size:
            part += remaining[:size - len(part)]
        scanned += size
        passed += _filter(part, demand, active, removed, size).passed
    return FilterResult(passed[:limit], removed, scanned)


# Smallest piece of a chunked scan: below it, per-chunk overhead shows.
_MIN_CHUNK = 64


def _filter(
    nodes: list[model.NodeView], demand: Demand, active: list[tuple[str, Filter]],
    removed: dict[str, int], considered: int,
) -> FilterResult:
    """Run `active` over `nodes`, adding what each removes to `removed`."""
    return FilterResult(apply(nodes, demand, active, removed), removed, considered)


def apply(
    nodes: list[model.NodeView], demand: Demand, active: list[tuple[str, Filter]],
    removed: dict[str, int],
) -> list[model.NodeView]:
    """The nodes that pass every filter of `active`, in their order; counts go to `removed`."""
    for name, keep in active:
        kept = keep(nodes, demand)
        removed[name] = removed.get(name, 0) + len(nodes) - len(kept)
        nodes = kept
    return nodes
