"""Small shared pieces of identity's records: ids, names, masks, pages, request scopes."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from google.protobuf import descriptor, message, timestamp_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors
from services.common.context import Principal
from services.common.store import Store, Versioned

M = TypeVar("M", bound=message.Message)
T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_id() -> str:
    return str(uuid.uuid4())


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def method(name: str) -> descriptor.MethodDescriptor:
    """The IdentityService method `name` (what a request_id record names)."""
    service = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    found: descriptor.MethodDescriptor = service.methods_by_name[name]
    return found


def scope(principal: Principal | None) -> str:
    """The project a caller's request ids belong to ("" = cloud scope)."""
    return principal.project_id if principal is not None else ""


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


def check_id(value: str, field: str = "id") -> None:
    """A malformed id is bad input (INVALID_ARGUMENT), not a missing resource."""
    if not _UUID.fullmatch(value):
        raise errors.InvalidArgument(
            f"{field} must be a UUID",
            violations=[errors.FieldViolation(field, "must be a UUID")],
        )


# Metadata fields a mask names as `meta.<field>` (docs/api.md) or, as before, bare.
_META_FIELDS = frozenset({"name", "description", "labels"})


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


async def filtered_page(
    store: Store, prefix: str, msg_type: type[M], keep: Callable[[Versioned[M]], bool], *,
    size: int, page_token: str,
) -> tuple[list[Versioned[M]], str]:
    """Up to `size` records under `prefix` that `keep` accepts, and the next page's token.

    Each read asks only for what is still missing, so the store's cursor after
    the last read is exactly the cursor after the last record returned.
    """
    found: list[Versioned[M]] = []
    token = page_token
    while True:
        page = await store.list(prefix, msg_type, page_size=size - len(found), page_token=token)
        found += [item for item in page.items if keep(item)]
        token = page.next_page_token
        if not token or len(found) >= size:
            return found, token


def page_of(items: Sequence[T], key: Callable[[T], str], *, size: int,
            page_token: str) -> tuple[list[T], str]:
    """One page of an in-memory list sorted by `key` (the record's id).

    The token is the last id returned, opaque; a token that does not carry an
    id is not one this listing returned: INVALID_ARGUMENT.
    """
    after = _page_cursor(page_token) if page_token else ""
    rest = [item for item in items if key(item) > after]
    page = rest[:size]
    more = len(rest) > size
    next_token = base64.urlsafe_b64encode(key(page[-1]).encode()).decode() if more else ""
    return page, next_token


def _page_cursor(page_token: str) -> str:
    try:
        after = base64.urlsafe_b64decode(page_token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        after = ""
    if not _UUID.fullmatch(after):
        raise errors.InvalidArgument(
            "page_token is not a token this listing returned",
            violations=[errors.FieldViolation("page_token", "not from this listing")],
        )
    return after
