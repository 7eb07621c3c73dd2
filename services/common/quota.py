"""Per-project quota: the one helper every service uses to count what a project uses.

`reserve` and `release` run inside `Store.atomic`, next to the write of the
resource they count, so usage and resources commit (or fail) together: two
replicas racing for the last unit both read the same usage revision, and the
compare on it lets exactly one commit (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping

from nubis.identity.v1 import identity_pb2

from services.common import errors
from services.common.store import Txn

# Every quota-counted resource, in the order operators see them.
RESOURCES: tuple[str, ...] = (
    "instances", "vcpus", "ram_mb", "volumes", "volume_gb", "snapshots",
    "networks", "subnets", "ports", "routers", "floating_ips", "security_groups",
)
UNLIMITED = -1


def quota_key(project_id: str) -> str:
    return f"identity/quotas/{project_id}"


def usage_key(project_id: str) -> str:
    return f"identity/usage/{project_id}"


def effective_limits(
    quota: identity_pb2.Quota | None, defaults: Mapping[str, int]
) -> dict[str, int]:
    """Every resource's limit: the project's override, else the default (else unlimited)."""
    overrides = dict(quota.limits) if quota is not None else {}
    return {name: overrides.get(name, defaults.get(name, UNLIMITED)) for name in RESOURCES}


def _check_amounts(amounts: Mapping[str, int]) -> None:
    violations = errors.ViolationCollector()
    for name, amount in amounts.items():
        if name not in RESOURCES:
            violations.add(name, "not a quota resource")
        elif amount < 0:
            violations.add(name, "amount must not be negative")
    violations.check("invalid quota amounts")


async def reserve(
    txn: Txn, project_id: str, amounts: Mapping[str, int], *, defaults: Mapping[str, int]
) -> identity_pb2.Usage:
    """Add `amounts` to the project's usage in `txn`, or raise ResourceExhausted.

    The usage and quota records are read through `txn`, so the commit fails
    (and the transaction body re-runs) if anyone changed them meanwhile.
    """
    _check_amounts(amounts)
    quota = await txn.get(quota_key(project_id), identity_pb2.Quota)
    current = await txn.get(usage_key(project_id), identity_pb2.Usage)
    usage = identity_pb2.Usage(project_id=project_id)
    if current is not None:
        usage.CopyFrom(current.value)
    limits = effective_limits(quota.value if quota else None, defaults)
    for name, amount in amounts.items():
        in_use = usage.in_use.get(name, 0)
        limit = limits[name]
        if limit != UNLIMITED and in_use + amount > limit:
            raise errors.ResourceExhausted(
                f"quota exceeded for {name}: limit {limit}, in use {in_use}, requested {amount}",
                reason="nubis.quota.exceeded",
                metadata={"resource": name, "limit": str(limit), "in_use": str(in_use),
                          "requested": str(amount), "project_id": project_id},
            )
    for name, amount in amounts.items():
        usage.in_use[name] = usage.in_use.get(name, 0) + amount
    txn.put(usage_key(project_id), usage)
    return usage


async def release(
    txn: Txn, project_id: str, amounts: Mapping[str, int]
) -> identity_pb2.Usage:
    """Subtract `amounts` from the project's usage in `txn` (never below zero)."""
    _check_amounts(amounts)
    current = await txn.get(usage_key(project_id), identity_pb2.Usage)
    usage = identity_pb2.Usage(project_id=project_id)
    if current is not None:
        usage.CopyFrom(current.value)
    for name, amount in amounts.items():
        usage.in_use[name] = max(0, usage.in_use.get(name, 0) - amount)
    txn.put(usage_key(project_id), usage)
    return usage
