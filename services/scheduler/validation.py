"""Checks on names and request fields shared by the scheduler's domain modules."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors

# Node names become etcd key segments and Celery queue names.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Consumer and group ids: UUIDs in practice; any safe key segment is accepted.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
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


def is_uuid(value: str) -> bool:
    return _UUID.fullmatch(value) is not None


def page_token(listing: str, cursor: str) -> str:
    """An opaque token for the page after `cursor` (the last name or id returned)."""
    return base64.urlsafe_b64encode(f"{listing}:{cursor}".encode()).decode().rstrip("=")


def page_cursor(token: str, listing: str, well_formed: Callable[[str], bool]) -> str:
    """The cursor a `page_token` of `listing` carries ("" for the first page).

    Anything else — not base64, another listing's token, a cursor that is no
    name or id at all — is INVALID_ARGUMENT rather than a silently empty page.
    """
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    tag, _, cursor = raw.partition(":")
    if tag != listing or not well_formed(cursor):
        raise errors.InvalidArgument(
            "page_token is not a token this listing returned",
            violations=[errors.FieldViolation("page_token", "not from this listing")],
        )
    return cursor


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
