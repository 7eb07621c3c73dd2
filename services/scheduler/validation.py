"""The scheduler's own checks on request fields: node names, consumer ids, resources, traits.

Ids, names, labels, masks and page tokens every service shares are in
``services.common.resources`` and ``services.common.pages``.
"""

from __future__ import annotations

import re

from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors

# Node names become etcd key segments and Celery queue names.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Consumer and group ids: UUIDs in practice; any safe key segment is accepted.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# Placement's trait syntax: upper-case, digits and underscores.
_TRAIT = re.compile(r"^[A-Z][A-Z0-9_]{0,254}$")
MAX_COUNT = 100


def node_name(value: str, field: str = "name") -> str:
    if not _NODE_NAME.fullmatch(value):
        raise errors.InvalidArgument(
            f"invalid node name {value!r}",
            violations=[errors.FieldViolation(field, "letters, digits, '.', '_', '-' (1-63)")],
        )
    return value


def identifier(value: str, field: str, kind: str) -> str:
    if not _ID.fullmatch(value):
        raise errors.InvalidArgument(
            f"invalid {kind} id {value!r}",
            violations=[errors.FieldViolation(field, f"a {kind} id (UUID) is required")],
        )
    return value


def is_node_name(value: str) -> bool:
    return _NODE_NAME.fullmatch(value) is not None


def resources(
    value: scheduler_pb2.Resources, field: str, collector: errors.ViolationCollector,
    *, require_some: bool,
) -> None:
    for rc in ("vcpus", "memory_mb", "disk_gb"):
        if getattr(value, rc) < 0:
            collector.add(f"{field}.{rc}", "must not be negative")
    if require_some and not (value.vcpus or value.memory_mb or value.disk_gb):
        collector.add(field, "at least one of vcpus, memory_mb, disk_gb must be positive")


def traits(values: list[str], field: str, collector: errors.ViolationCollector) -> None:
    for index, trait in enumerate(values):
        if not _TRAIT.fullmatch(trait):
            collector.add(f"{field}[{index}]", "traits are upper-case letters, digits and '_'")
