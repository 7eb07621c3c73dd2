"""Weighers: order the nodes that passed the filters (pure).

Each resource class counts the node's free amount scaled by the largest
usable amount of that class among all known nodes, so multipliers compare
like with like (Nova scales by the spread of the candidates instead, which
makes a node's weight depend on which other nodes passed the filters). Here
the resource weight depends only on the node, the multipliers and that
cluster-wide scale, never on the request: the node cache keeps every node in
that order (ranking.py), and a decision reads the best few from its head.
Soft (anti-)affinity adds a term that depends on the request's server group;
such requests weigh their candidates here in full.
The best few nodes are then chosen from at random, so that scheduler replicas
deciding on the same cache rarely race for the same node.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Collection, Iterable, Sequence

from services.common.settings import SchedulerSettings
from services.scheduler import filters, model

Policy = filters.Policy
# Weight per unit of free vCPU, MB of memory and GB of disk.
Coefficients = tuple[float, float, float]


def _normalised(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    span = high - low
    return [(value - low) / span for value in values]


def scale_of(nodes: Iterable[model.NodeView]) -> model.Amounts:
    """The largest usable amount of each resource class among `nodes`."""
    largest = [0, 0, 0]
    for node in nodes:
        for index, amount in enumerate(node.usable):
            largest[index] = max(largest[index], amount)
    return (largest[0], largest[1], largest[2])


def coefficients(scale: model.Amounts, settings: SchedulerSettings) -> Coefficients:
    """Multiplier / scale per class, negated for pack (which prefers the least free)."""
    direction = -1.0 if settings.weigher == "pack" else 1.0
    multipliers = (
        settings.cpu_weight_multiplier,
        settings.ram_weight_multiplier,
        settings.disk_weight_multiplier,
    )
    out = [direction * multiplier / largest if multiplier and largest > 0 else 0.0
           for multiplier, largest in zip(multipliers, scale, strict=True)]
    return (out[0], out[1], out[2])


def resource_weight(free: model.Amounts, weights: Coefficients) -> float:
    """A node's weight for its free resources; higher is better.

    The node cache orders nodes by this very expression: keep it the one place
    it is computed, so both orders agree to the last bit.
    """
    return weights[0] * free[0] + weights[1] * free[1] + weights[2] * free[2]


def independent_of_request(demand: filters.Demand) -> bool:
    """Is the weight of every node for `demand` its resource weight alone?"""
    return not (_soft_group_sign(demand) and demand.group_nodes)


def weigh(
    nodes: Sequence[model.NodeView], demand: filters.Demand, settings: SchedulerSettings,
    scale: model.Amounts | None = None,
) -> list[float]:
    """One weight per node; higher is better.

    `scale` is the cluster-wide scale (the cache's); None takes it from `nodes`.
    """
    if not nodes:
        return []
    weights = coefficients(scale_of(nodes) if scale is None else scale, settings)
    values = [resource_weight(node.free, weights) for node in nodes]
    soft = _soft_group_sign(demand)
    if soft and demand.group_nodes:
        raw_members = [float(demand.group_nodes.get(node.name, 0)) for node in nodes]
        for position, value in enumerate(_normalised(raw_members)):
            values[position] += soft * settings.soft_affinity_weight_multiplier * value
    return values


def _soft_group_sign(demand: filters.Demand) -> float:
    if demand.group_policy == Policy.SOFT_AFFINITY:
        return 1.0
    if demand.group_policy == Policy.SOFT_ANTI_AFFINITY:
        return -1.0
    return 0.0


def _sample(
    nodes: Sequence[model.NodeView], size: int, rng: random.Random
) -> Sequence[model.NodeView]:
    """Every k-th node from a random offset: a spread-out sample in O(size).

    Like Placement's max_placement_results, only a sample of a very large
    candidate list is weighed; it keeps decisions fast at 10,000 nodes and
    moves racing replicas further apart. (random.sample costs a random draw
    per node, more than the weighing it saves.)
    """
    step = len(nodes) / size
    offset = rng.random() * step
    return [nodes[int(offset + index * step)] for index in range(size)]


def best(
    nodes: Sequence[model.NodeView],
    demand: filters.Demand,
    settings: SchedulerSettings,
    rng: random.Random,
    busy: Collection[str] = (),
    scale: model.Amounts | None = None,
) -> list[model.NodeView]:
    """Candidates in the order a claim should try them.

    The first is drawn at random from the `host_subset_size` best; the others
    follow by weight, so a claim that loses a race falls back to the next best.
    Nodes in `busy` (claims of this replica still in flight there) go last:
    a second claim on such a node would only lose its compare to the first.
    """
    if len(nodes) > settings.max_candidates:
        nodes = _sample(nodes, settings.max_candidates, rng)
    weights = weigh(nodes, demand, settings, scale)
    # nlargest keeps the first of equal weights; starting the scan at a random
    # node breaks ties differently per decision, so racing replicas facing a
    # row of equally empty nodes do not all pick the same ones.
    start = rng.randrange(len(nodes)) if nodes else 0
    ranked = heapq.nlargest(
        max(settings.host_subset_size, settings.claim_attempts) + len(busy),
        itertools.chain(range(start, len(nodes)), range(start)),
        key=weights.__getitem__,
    )
    if busy:
        idle = [index for index in ranked if nodes[index].name not in busy]
        ranked = idle + [index for index in ranked if nodes[index].name in busy]
    subset = max(1, min(settings.host_subset_size, len(ranked)))
    head = ranked[:subset]
    rng.shuffle(head)
    return [nodes[index] for index in head + ranked[subset:]]
