"""What the scheduler knows about one node, and the capacity arithmetic on it (pure).

A decision looks at thousands of nodes, so each `NodeView` carries its derived
facts (usable capacity, traits, zone) computed once when the cache changes,
as plain tuples and sets rather than protobuf messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NewType

from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import SchedulerSettings

NodeName = NewType("NodeName", str)
ConsumerId = NewType("ConsumerId", str)

# Order of the three resource classes in every Amounts tuple.
RESOURCE_CLASSES = ("vcpus", "memory_mb", "disk_gb")
_RATIO_OF = {"vcpus": "cpu", "memory_mb": "ram", "disk_gb": "disk"}

Amounts = tuple[int, int, int]
ZERO: Amounts = (0, 0, 0)

_BUILT_IN = SchedulerSettings()
# The ratios of a cloud whose default-ratios record was never written.
BUILT_IN_RATIOS = scheduler_pb2.AllocationRatios(
    cpu=_BUILT_IN.cpu_allocation_ratio, ram=_BUILT_IN.ram_allocation_ratio,
    disk=_BUILT_IN.disk_allocation_ratio,
)


def amounts(resources: scheduler_pb2.Resources) -> Amounts:
    return (resources.vcpus, resources.memory_mb, resources.disk_gb)


def to_resources(values: Amounts) -> scheduler_pb2.Resources:
    return scheduler_pb2.Resources(vcpus=values[0], memory_mb=values[1], disk_gb=values[2])


def plus(a: Amounts, b: Amounts) -> Amounts:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def minus(a: Amounts, b: Amounts) -> Amounts:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def within(want: Amounts, room: Amounts) -> bool:
    return want[0] <= room[0] and want[1] <= room[1] and want[2] <= room[2]


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node as a decision sees it: the agent's report, operator settings, usage.

    `report` is None when the node's lease lapsed (DOWN). `usage_revision` is
    the mod_revision of the usage record this view holds (0: none yet); a claim
    compares on it, like a Placement resource-provider generation. It compares
    `report_revision` and `settings_revision` too (0: record absent), since the
    usable capacity, `up` and `enabled` are derived from those two records, and
    `ratios_revision`, the cloud's default ratios the capacity was computed with.
    """

    name: NodeName
    report: scheduler_pb2.NodeReport | None
    settings: scheduler_pb2.NodeSettings | None
    usage_revision: int
    up: bool
    enabled: bool
    traits: frozenset[str]
    availability_zone: str
    hypervisor_type: str
    usable: Amounts
    used: Amounts
    # usable - used, kept as a field: the capacity filter reads it on every node.
    free: Amounts
    allocation_count: int
    report_revision: int = 0
    settings_revision: int = 0
    ratios_revision: int = 0

    @property
    def last_report(self) -> scheduler_pb2.NodeReport:
        """The live report, else the last one remembered in the settings."""
        return last_report(NodeName(self.name), self.report, self.settings)


def last_report(
    name: NodeName,
    report: scheduler_pb2.NodeReport | None,
    settings: scheduler_pb2.NodeSettings | None,
) -> scheduler_pb2.NodeReport:
    if report is not None:
        return report
    if settings is not None and settings.HasField("last_report"):
        return settings.last_report
    return scheduler_pb2.NodeReport(name=name)


def default_ratios(
    record: scheduler_pb2.DefaultAllocationRatios | None,
) -> scheduler_pb2.AllocationRatios:
    """The cloud's default ratios from its record (built-in ones where it has none)."""
    ratios = scheduler_pb2.AllocationRatios()
    ratios.CopyFrom(BUILT_IN_RATIOS)
    if record is not None:
        ratios.MergeFrom(record.ratios)
    return ratios


def effective_ratios(
    settings: scheduler_pb2.NodeSettings | None, defaults: scheduler_pb2.AllocationRatios
) -> scheduler_pb2.AllocationRatios:
    """The node's ratios with the cloud's defaults (all three set) filled in where unset."""
    ratios = scheduler_pb2.AllocationRatios()
    ratios.CopyFrom(defaults)
    if settings is not None:
        own = settings.allocation_ratios
        for field in ("cpu", "ram", "disk"):
            if own.HasField(field):
                setattr(ratios, field, getattr(own, field))
    return ratios


def usable_capacity(
    capacity: scheduler_pb2.Resources,
    settings: scheduler_pb2.NodeSettings | None,
    defaults: scheduler_pb2.AllocationRatios,
) -> Amounts:
    """(capacity - reserved) * ratio per class, rounded down: what may be allocated."""
    reserved = amounts(settings.reserved) if settings is not None else ZERO
    ratios = effective_ratios(settings, defaults)
    out = []
    for index, rc in enumerate(RESOURCE_CLASSES):
        ratio = getattr(ratios, _RATIO_OF[rc])
        total = (getattr(capacity, rc) - reserved[index]) * ratio
        # The epsilon keeps 1.5 * 2048 from rounding down to 3071.
        out.append(max(0, math.floor(total + 1e-9)))
    return (out[0], out[1], out[2])


def make_view(
    name: NodeName,
    report: scheduler_pb2.NodeReport | None,
    settings: scheduler_pb2.NodeSettings | None,
    usage: scheduler_pb2.NodeUsage | None,
    usage_revision: int,
    defaults: scheduler_pb2.AllocationRatios,
    *,
    report_revision: int = 0,
    settings_revision: int = 0,
    ratios_revision: int = 0,
) -> NodeView:
    """Derive everything a decision needs about a node once."""
    seen = last_report(name, report, settings)
    usable = usable_capacity(seen.capacity, settings, defaults)
    used = amounts(usage.used) if usage is not None else ZERO
    extra_traits = settings.traits if settings is not None else ()
    zone = settings.availability_zone if settings is not None else ""
    return NodeView(
        name=name,
        report=report,
        settings=settings,
        usage_revision=usage_revision,
        up=report is not None,
        enabled=settings is None or not settings.disabled,
        traits=frozenset(seen.traits) | frozenset(extra_traits),
        availability_zone=zone or seen.availability_zone,
        hypervisor_type=seen.hypervisor_type,
        usable=usable,
        used=used,
        free=minus(usable, used),
        allocation_count=usage.allocation_count if usage is not None else 0,
        report_revision=report_revision if report is not None else 0,
        settings_revision=settings_revision if settings is not None else 0,
        ratios_revision=ratios_revision,
    )


def with_used(view: NodeView, used: Amounts, count: int, revision: int) -> NodeView:
    """The same node with other usage (a fresher read, or a planned claim)."""
    return replace(view, used=used, free=minus(view.usable, used), allocation_count=count,
                   usage_revision=revision)
