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


Predicate = Callable[[model.NodeView, Demand], bool]


def _compute(node: model.NodeView, demand: Demand) -> bool:
    return node.up and node.enabled


def _avoid(node: model.NodeView, demand: Demand) -> bool:
    return node.name not in demand.avoid_nodes


def _capacity(node: model.NodeView, demand: Demand) -> bool:
    return model.within(demand.resources, model.minus(node.usable, node.used))


def _traits(node: model.NodeView, demand: Demand) -> bool:
    return demand.required_traits <= node.traits and not (demand.forbidden_traits & node.traits)


def _zone(node: model.NodeView, demand: Demand) -> bool:
    return node.availability_zone == demand.availability_zone


def _hypervisor(node: model.NodeView, demand: Demand) -> bool:
    return node.hypervisor_type.lower() == demand.hypervisor_type.lower()


def _affinity(node: model.NodeView, demand: Demand) -> bool:
    # The first member may go anywhere; the rest follow it.
    return not demand.group_nodes or node.name in demand.group_nodes


def _anti_affinity(node: model.NodeView, demand: Demand) -> bool:
    return node.name not in demand.group_nodes


def active_filters(demand: Demand) -> list[tuple[str, Predicate]]:
    """The filters this demand needs, cheapest and most selective first."""
    chosen: list[tuple[str, Predicate]] = [("ComputeFilter", _compute)]
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


def run(nodes: Iterable[model.NodeView], demand: Demand) -> FilterResult:
    """Apply the active filters to every node."""
    filters = active_filters(demand)
    removed = {name: 0 for name, _ in filters}
    passed: list[model.NodeView] = []
    considered = 0
    for node in nodes:
        considered += 1
        for name, predicate in filters:
            if not predicate(node, demand):
                removed[name] += 1
                break
        else:
            passed.append(node)
    return FilterResult(passed, removed, considered)
