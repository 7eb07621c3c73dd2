"""Weighers: order the nodes that passed the filters (pure).

Like Nova, each weigher's raw values are normalised to 0..1 across the
candidates before its multiplier applies, so multipliers compare like with like.
The best few nodes are then chosen from at random, so that scheduler replicas
deciding on the same cache rarely race for the same node.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Collection, Sequence

from services.common.settings import SchedulerSettings
from services.scheduler import filters, model

Policy = filters.Policy


def _normalised(values: Sequence[float]) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    span = high - low
    return [(value - low) / span for value in values]


def weigh(
    nodes: Sequence[model.NodeView], demand: filters.Demand, settings: SchedulerSettings
) -> list[float]:
    """One weight per node; higher is better."""
    if not nodes:
        return []
    # Spread prefers the most free resources; pack the least.
    direction = -1.0 if settings.weigher == "pack" else 1.0
    multipliers = (
        settings.cpu_weight_multiplier,
        settings.ram_weight_multiplier,
        settings.disk_weight_multiplier,
    )
    # Each class is normalised to 0..1 across the candidates, i.e. weighted by
    # multiplier / (high - low): fold the three into one pass over the nodes.
    frees = [node.free for node in nodes]
    coefficients = [0.0, 0.0, 0.0]
    offset = 0.0
    columns = zip(*frees, strict=True)
    for index, (multiplier, column) in enumerate(zip(multipliers, columns, strict=True)):
        low, high = min(column), max(column)
        if not multiplier or high == low:
            continue
        coefficients[index] = direction * multiplier / (high - low)
        offset += low * coefficients[index]
    cpu, ram, disk = coefficients
    weights = [cpu * vcpus + ram * memory + disk * disk_gb - offset
               for vcpus, memory, disk_gb in frees]
    soft = _soft_group_sign(demand)
    if soft and demand.group_nodes:
        raw_members = [float(demand.group_nodes.get(node.name, 0)) for node in nodes]
        for position, value in enumerate(_normalised(raw_members)):
            weights[position] += soft * settings.soft_affinity_weight_multiplier * value
    return weights


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
) -> list[model.NodeView]:
    """Candidates in the order a claim should try them.

    The first is drawn at random from the `host_subset_size` best; the others
    follow by weight, so a claim that loses a race falls back to the next best.
    Nodes in `busy` (claims of this replica still in flight there) go last:
    a second claim on such a node would only lose its compare to the first.
    """
    if len(nodes) > settings.max_candidates:
        nodes = _sample(nodes, settings.max_candidates, rng)
    weights = weigh(nodes, demand, settings)
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
