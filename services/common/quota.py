"""Per-project quota: the one helper every service uses to count what a project uses.

`reserve` and `release` run inside `Store.atomic`, next to the write of the
resource they count, so usage and resources commit (or fail) together: two
replicas racing for the last unit both read the same usage revision, and the
compare on it lets exactly one commit (DESIGN.md §3).

A limit is the project's override, else the cloud's default, a record in etcd
(``identity/quota-defaults``, written by bootstrap and UpdateDefaultQuota), else
the built-in default. `reserve` reads both records in its transaction, so every
replica, whatever its settings, enforces the same limits, and a change of
either that lands during a reservation makes it run again on the new value.
"""

from __future__ import annotations

from collections.abc import Mapping

from nubis.identity.v1 import identity_pb2

from services.common import errors, settings
from services.common.store import Txn

# Every quota-counted resource, in the order operators see them.
RESOURCES: tuple[str, ...] = (
    "instances", "vcpus", "ram_mb", "volumes", "volume_gb", "snapshots",
    "networks", "subnets", "ports", "routers", "floating_ips", "security_groups",
    "security_group_rules",
)
UNLIMITED = -1
DEFAULTS_KEY = "identity/quota-defaults"
# What a cloud whose defaults record was never written gets: the same code gives
# every replica the same numbers (settings only seed the record, at bootstrap).
BUILT_IN_DEFAULTS: Mapping[str, int] = settings.QuotaSettings().defaults


def quota_key(project_id: str) -> str:
    return f"identity/quotas/{project_id}"


def usage_key(project_id: str) -> str:
    return f"identity/usage/{project_id}"


def default_limits(stored: identity_pb2.Quota | None) -> dict[str, int]:
    """Every resource's default: the cloud's stored default, else the built-in one."""
    chosen = dict(stored.limits) if stored is not None else {}
    return {name: chosen.get(name, BUILT_IN_DEFAULTS.get(name, UNLIMITED)) for name in RESOURCES}


def effective_limits(
    quota: identity_pb2.Quota | None, defaults: identity_pb2.Quota | None
) -> dict[str, int]:
    """Every resource's limit: the project's override, else the cloud's default."""
    overrides = dict(quota.limits) if quota is not None else {}
    return {name: overrides.get(name, limit) for name, limit in default_limits(defaults).items()}


async def limits_in(txn: Txn, project_id: str) -> dict[str, int]:
    """The project's limits as `txn` reads them (override, cloud default, built-in)."""
    quota = await txn.get(quota_key(project_id), identity_pb2.Quota)
    defaults = await txn.get(DEFAULTS_KEY, identity_pb2.Quota)
    return effective_limits(quota.value if quota else None, defaults.value if defaults else None)


def _check_amounts(amounts: Mapping[str, int]) -> None:
    violations = errors.ViolationCollector()
    for name, amount in amounts.items():
        if name not in RESOURCES:
            violations.add(name, "not a quota resource")
        elif amount < 0:
            violations.add(name, "amount must not be negative")
    violations.check("invalid quota amounts")


async def reserve(
    txn: Txn, project_id: str, amounts: Mapping[str, int]
) -> identity_pb2.Usage:
    """Add `amounts` to the project's usage in `txn`, or raise ResourceExhausted.

    The usage, quota and default records are read through `txn`, so the commit
    fails (and the transaction body re-runs) if anyone changed them meanwhile.
    """
    _check_amounts(amounts)
    limits = await limits_in(txn, project_id)
    current = await txn.get(usage_key(project_id), identity_pb2.Usage)
    usage = identity_pb2.Usage(project_id=project_id)
    if current is not None:
        usage.CopyFrom(current.value)
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
