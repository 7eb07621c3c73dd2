"""Small shared pieces of identity's records: ids, timestamps, name rules, field masks."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from google.protobuf import timestamp_pb2
from nubis.common.v1 import resource_pb2

from services.common import errors

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def check_name(violations: errors.ViolationCollector, field: str, name: str) -> None:
    """Names are 1-63 characters of letters, digits and ``_.@-``, starting alphanumeric."""
    if not _NAME.match(name):
        violations.add(field, "must be 1-63 letters, digits or _.@- starting with a letter/digit")


def check_labels(violations: errors.ViolationCollector, field: str,
                 labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 255:
            violations.add(f"{field}.{key}", "label keys are 1-63 chars, values up to 255")


def check_id(value: str, field: str = "id") -> None:
    """A malformed id is bad input (INVALID_ARGUMENT), not a missing resource."""
    if not _UUID.match(value):
        raise errors.InvalidArgument(
            f"{field} must be a UUID",
            violations=[errors.FieldViolation(field, "must be a UUID")],
        )


def check_mask(paths: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The update_mask paths, all of them known; an empty mask is an error."""
    allowed_set = set(allowed)
    chosen = list(paths)
    violations = errors.ViolationCollector()
    if not chosen:
        violations.add("update_mask", f"name at least one of: {', '.join(sorted(allowed_set))}")
    for path in chosen:
        if path not in allowed_set:
            violations.add("update_mask", f"unknown or read-only field: {path}")
    violations.check("invalid update_mask")
    return chosen


def fresh_meta(meta: resource_pb2.ResourceMeta, project_id: str = "") -> resource_pb2.ResourceMeta:
    """Server-owned metadata for a new record, keeping the caller's name/labels/description."""
    stamp = now()
    return resource_pb2.ResourceMeta(
        id=new_id(), name=meta.name, project_id=project_id, labels=dict(meta.labels),
        description=meta.description, create_time=stamp, update_time=stamp,
    )


def page_size(requested: int) -> int:
    if requested < 0:
        raise errors.InvalidArgument(
            "page_size must not be negative",
            violations=[errors.FieldViolation("page_size", "must be >= 0")],
        )
    return min(requested or 100, 1000)
