"""The cloud's default allocation ratios: one record in etcd that every replica plans and claims on.

A node's settings may set its own ratios; every ratio they leave unset takes
the cloud's default, from `keys.default_ratios()`. The first scheduler to
start writes that record from its settings if it is absent (a create, so of
racing first starts one wins and the others read it); after that only a
cloud-admin changes it. No replica's own settings decide a capacity, so two
replicas started from different configuration files agree on every node. The
informer cache holds the record (watched) and every claim compares its
revision, as it does a node's settings (placement.NodeGuard).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import structlog
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, resources
from services.common.settings import SchedulerSettings
from services.common.store import Store, Txn, Versioned
from services.scheduler import cache as cache_module
from services.scheduler import keys, model

log = structlog.get_logger(__name__)

Ratio = Literal["cpu", "ram", "disk"]
FIELDS: tuple[Ratio, ...] = ("cpu", "ram", "disk")
MAX_RATIO = 1000.0
_PATHS: dict[str, Ratio] = {f"ratios.{field}": field for field in FIELDS}


def check(
    ratios: scheduler_pb2.AllocationRatios, where: str, found: errors.ViolationCollector
) -> None:
    """Note every set ratio outside (0, MAX_RATIO], as `<where>.<field>`."""
    for field in FIELDS:
        if ratios.HasField(field) and not 0.0 < getattr(ratios, field) <= MAX_RATIO:
            found.add(f"{where}.{field}", f"must be in (0, {MAX_RATIO:g}]")


def from_settings(settings: SchedulerSettings) -> scheduler_pb2.AllocationRatios:
    """The ratios a first scheduler seeds the record with."""
    return scheduler_pb2.AllocationRatios(
        cpu=settings.cpu_allocation_ratio, ram=settings.ram_allocation_ratio,
        disk=settings.disk_allocation_ratio,
    )


def _shown(stored: Versioned[scheduler_pb2.DefaultAllocationRatios] | None) -> (
    scheduler_pb2.DefaultAllocationRatios
):
    """The API view: all three ratios (built-in ones if never written) and the revision."""
    shown = scheduler_pb2.DefaultAllocationRatios(
        ratios=model.default_ratios(stored.value if stored else None))
    if stored is not None:
        shown.update_time.CopyFrom(stored.value.update_time)
        shown.revision = stored.mod_revision
    return shown


async def ensure_defaults(store: Store, settings: SchedulerSettings) -> bool:
    """Write the cloud's defaults from `settings` unless a record exists; True if written."""
    seed = from_settings(settings)
    found = errors.ViolationCollector()
    check(seed, "scheduling", found)
    found.check("invalid default allocation ratios in the settings")
    record = scheduler_pb2.DefaultAllocationRatios(ratios=seed, update_time=resources.now())
    written = False
    with contextlib.suppress(errors.AlreadyExists):
        await store.create(keys.default_ratios(), record)
        written = True
    stored = await store.find(keys.default_ratios(), scheduler_pb2.DefaultAllocationRatios)
    if stored is not None and stored.value.ratios != seed:
        # Said once at start: an operator editing a replica's file sees why nothing changed.
        log.warning("the cloud's default allocation ratios differ from this replica's "
                    "settings; the cloud's apply (change them with "
                    "UpdateDefaultAllocationRatios)",
                    cloud=str(stored.value.ratios).replace("\n", " "))
    return written


async def get(store: Store) -> scheduler_pb2.DefaultAllocationRatios:
    """The cloud's default ratios as stored (revision 0: never written)."""
    return _shown(await store.find(keys.default_ratios(), scheduler_pb2.DefaultAllocationRatios))


def _changes(
    request: scheduler_pb2.UpdateDefaultAllocationRatiosRequest,
) -> dict[Ratio, float]:
    """Ratio name -> new value from the mask; INVALID_ARGUMENT naming every fault."""
    found = errors.ViolationCollector()
    given = request.default_allocation_ratios.ratios
    paths = list(request.update_mask.paths)
    if not paths:
        found.add("update_mask", "name at least one ratio to change")
    named: list[Ratio] = []
    for path in paths:
        if path == "ratios":
            named += FIELDS
        elif path in _PATHS:
            named.append(_PATHS[path])
        else:
            found.add("update_mask", f"unknown or read-only field {path!r}")
    where = "default_allocation_ratios.ratios"
    for field in dict.fromkeys(named):
        if not given.HasField(field):
            found.add(f"{where}.{field}", "named in update_mask: give its new value")
    check(given, where, found)
    found.check("invalid default allocation ratios")
    return {field: getattr(given, field) for field in dict.fromkeys(named)}


async def update(
    store: Store, cache: cache_module.NodeCache,
    request: scheduler_pb2.UpdateDefaultAllocationRatiosRequest,
) -> scheduler_pb2.DefaultAllocationRatios:
    """Change some of the cloud's defaults (cloud-admin; the policy table checks it)."""
    changes = _changes(request)
    expected = request.default_allocation_ratios.revision

    async def body(txn: Txn) -> scheduler_pb2.DefaultAllocationRatios:
        current = await txn.get(keys.default_ratios(), scheduler_pb2.DefaultAllocationRatios)
        revision = current.mod_revision if current is not None else 0
        if expected and expected != revision:
            raise errors.Conflict(
                "the default allocation ratios changed since they were read; read them "
                "again and retry",
                metadata={"expected_revision": str(expected), "revision": str(revision)})
        record = scheduler_pb2.DefaultAllocationRatios(
            ratios=model.default_ratios(current.value if current else None),
            update_time=resources.now())
        for field, value in changes.items():
            setattr(record.ratios, field, value)
        txn.put(keys.default_ratios(), record)
        return record

    await store.atomic(body)
    stored = await store.find(keys.default_ratios(), scheduler_pb2.DefaultAllocationRatios)
    if stored is not None:
        # This replica's next decision uses them before its watch delivers them.
        cache.observe_ratios(stored)
    return _shown(stored)
