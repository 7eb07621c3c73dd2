"""What every service's resources share: ids, metadata, name/label/mask checks, key segments.

A domain module builds a new record with `fresh_meta`, checks what the caller
sent with `check_name`, `check_labels`, `check_id` and `check_mask`, and
builds its keys (in its service's ``keys`` module) from `key` and `scoped`.
Paging lives in ``services.common.pages``, list filters in
``services.common.filtering``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import NewType

from google.protobuf import descriptor, timestamp_pb2
from nubis.common.v1 import resource_pb2

from services.common import errors
from services.common.context import Principal, ProjectId

# A resource's server-assigned UUID (`meta.id`), so it cannot be swapped with a name.
ResourceId = NewType("ResourceId", str)

# The key segment (and request-id scope) of what belongs to no project:
# cloud-wide role assignments, requests of a caller without a project.
CLOUD_SCOPE = "_cloud"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Metadata fields a mask names as `meta.<field>` (docs/api.md) or, as before, bare.
_META_FIELDS = frozenset({"name", "description", "labels"})


def new_id() -> ResourceId:
    return ResourceId(str(uuid.uuid4()))


def is_uuid(value: str) -> bool:
    """Whether `value` is a UUID as the server writes them (lower-case, hyphenated)."""
    return _UUID.fullmatch(value) is not None


def check_id(value: str, field: str = "id") -> ResourceId:
    """A malformed id is bad input (INVALID_ARGUMENT), not a missing resource."""
    if not is_uuid(value):
        raise errors.InvalidArgument(
            f"{field} must be a UUID",
            violations=[errors.FieldViolation(field, "must be a UUID")],
        )
    return ResourceId(value)


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def fresh_meta(meta: resource_pb2.ResourceMeta, project_id: str = "") -> resource_pb2.ResourceMeta:
    """Server-owned metadata for a new record, keeping the caller's name/labels/description."""
    stamp = now()
    return resource_pb2.ResourceMeta(
        id=new_id(), name=meta.name, project_id=project_id, labels=dict(meta.labels),
        description=meta.description, create_time=stamp, update_time=stamp,
    )


def method(file: descriptor.FileDescriptor, service: str,
           name: str) -> descriptor.MethodDescriptor:
    """The RPC `service`.`name` of a generated module's `file` (what a request_id record names)."""
    found: descriptor.MethodDescriptor = file.services_by_name[service].methods_by_name[name]
    return found


def scope(principal: Principal | None) -> ProjectId:
    """The project a caller's request ids belong to ("" = cloud scope)."""
    return principal.project_id if principal is not None else ProjectId("")


def is_name(name: str) -> bool:
    """Whether `name` is a well-formed name (a lookup by any other name finds nothing)."""
    return _NAME.fullmatch(name) is not None


def check_name(violations: errors.ViolationCollector, field: str, name: str) -> None:
    """Names are 1-63 characters of letters, digits and ``_.@-``, starting alphanumeric."""
    if not is_name(name):
        violations.add(field, "must be 1-63 letters, digits or _.@- starting with a letter/digit")


def check_labels(violations: errors.ViolationCollector, field: str,
                 labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 255:
            violations.add(f"{field}.{key}", "label keys are 1-63 chars, values up to 255")


def check_mask(paths: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The update_mask paths, all of them known, `meta.` dropped; an empty mask is an error."""
    allowed_set = set(allowed)
    chosen = [_bare(path) for path in paths]
    violations = errors.ViolationCollector()
    if not chosen:
        shown = (f"meta.{name}" if name in _META_FIELDS else name for name in allowed_set)
        violations.add("update_mask", f"name at least one of: {', '.join(sorted(shown))}")
    for path in chosen:
        if path not in allowed_set:
            violations.add("update_mask", f"unknown or read-only field: {path}")
    violations.check("invalid update_mask")
    return chosen


def _bare(path: str) -> str:
    field = path.removeprefix("meta.")
    return field if field in _META_FIELDS and field != path else path


def key(prefix: str, *segments: str) -> str:
    """``<prefix><segment>/<segment>...``: a record's key under its noun's prefix."""
    return prefix + "/".join(segments)


def scoped(prefix: str, project_id: str, *segments: str) -> str:
    """A key under `prefix` whose first segment is the project (`CLOUD_SCOPE` for none)."""
    return key(prefix, project_id or CLOUD_SCOPE, *segments)


def name_of(record_key: str, prefix: str) -> str:
    """The part of `record_key` after its noun's `prefix` (a node's name, a record's id)."""
    return record_key[len(prefix):]
