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

A project's usage is one record per service that counts it (`SHARDS`:
``identity/usage/<project>/compute``, ``…/storage``, ``…/network``). Every
create compares the record it writes, so with a single record a boot's port
create lost its commit to the instance creates of the same project, and the
other way round (a port batch ran 2.1 times on average while servers booted
at 20/s). A record written before the split (``identity/usage/<project>``)
still counts each resource until its service's record is first written.
"""

from __future__ import annotations

from collections.abc import Mapping

from nubis.identity.v1 import identity_pb2

from services.common import errors, settings
from services.common.store import Store, Txn

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


SHARDS: Mapping[str, tuple[str, ...]] = {
    "compute": ("instances", "vcpus", "ram_mb"),
    "storage": ("volumes", "volume_gb", "snapshots"),
    "network": ("networks", "subnets", "ports", "routers", "floating_ips", "security_groups",
                "security_group_rules"),
}
"""The services counting usage, each with its own record of the resources it creates."""
SHARD_OF: Mapping[str, str] = {name: shard for shard, names in SHARDS.items() for name in names}


def usage_key(project_id: str, shard: str) -> str:
    """The record of the project's usage of `shard`'s resources (one of `SHARDS`)."""
    if shard not in SHARDS:
        raise ValueError(f"{shard!r} is not a usage shard")
    return f"identity/usage/{project_id}/{shard}"


def usage_keys(project_id: str) -> list[tuple[str, str]]:
    """Every usage record of the project, as (shard, key)."""
    return [(shard, usage_key(project_id, shard)) for shard in SHARDS]


def legacy_usage_key(project_id: str) -> str:
    """The project's one usage record of before the split (read, never written)."""
    return f"identity/usage/{project_id}"


def shard_of(amounts: Mapping[str, int]) -> str:
    """The one shard counting every resource of `amounts` (ValueError if they span two)."""
    shards = {SHARD_OF[name] for name in amounts if name in SHARD_OF}
    if len(shards) != 1:
        raise ValueError(f"amounts of {sorted(amounts)} are not counted by one service")
    return shards.pop()


def _merged(shards: Mapping[str, identity_pb2.Usage | None],
           legacy: identity_pb2.Usage | None) -> dict[str, int]:
    """Every resource's use: from its shard's record, or from the record of before the
    split while its shard has none."""
    in_use: dict[str, int] = {}
    for shard, names in SHARDS.items():
        record = shards.get(shard) or legacy
        for name in names:
            in_use[name] = record.in_use.get(name, 0) if record is not None else 0
    return in_use


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


async def in_use(store: Store, project_id: str) -> tuple[dict[str, int], int]:
    """Every resource's use by the project, and the newest revision of its usage records."""
    # The record of before the split is the prefix of the shards': one listing reads all.
    legacy = legacy_usage_key(project_id)
    found, _ = await store.list_all(legacy, identity_pb2.Usage)
    by_key = {item.key: item for item in found}
    shards = {shard: by_key[key].value for shard, key in usage_keys(project_id)
              if key in by_key}
    return (_merged(shards, by_key[legacy].value if legacy in by_key else None),
            max((item.mod_revision for item in found), default=0))


async def reserve(
    txn: Txn, project_id: str, amounts: Mapping[str, int]
) -> identity_pb2.Usage:
    """Add `amounts` to the project's usage in `txn`, or raise ResourceExhausted.

    The usage, quota and default records are read through `txn`, so the commit
    fails (and the transaction body re-runs) if anyone changed them meanwhile.
    """
    _check_amounts(amounts)
    limits = await limits_in(txn, project_id)
    shard = shard_of(amounts)
    usage = await _current(txn, project_id, shard)
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
    txn.put(usage_key(project_id, shard), usage)
    return usage


async def release(
    txn: Txn, project_id: str, amounts: Mapping[str, int]
) -> identity_pb2.Usage:
    """Subtract `amounts` from the project's usage in `txn` (never below zero)."""
    _check_amounts(amounts)
    shard = shard_of(amounts)
    usage = await _current(txn, project_id, shard)
    for name, amount in amounts.items():
        usage.in_use[name] = max(0, usage.in_use.get(name, 0) - amount)
    txn.put(usage_key(project_id, shard), usage)
    return usage


async def _current(txn: Txn, project_id: str, shard: str) -> identity_pb2.Usage:
    """The shard's usage as `txn` reads it; while it has no record, its resources' counts
    in the record of before the split (zero without one)."""
    usage = identity_pb2.Usage(project_id=project_id)
    current = await txn.get(usage_key(project_id, shard), identity_pb2.Usage)
    if current is None:
        current = await txn.get(legacy_usage_key(project_id), identity_pb2.Usage)
        if current is not None:
            usage.in_use.update({name: count for name, count in current.value.in_use.items()
                                 if SHARD_OF.get(name) == shard})
        return usage
    usage.CopyFrom(current.value)
    return usage
