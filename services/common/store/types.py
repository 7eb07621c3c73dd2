"""Value types the store hands out: versioned values, list pages, watch events, leases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[M]):
    """A stored message with the etcd revisions that let a caller write it back safely."""

    key: str
    """Key relative to the store root, e.g. ``compute/instances/<id>``."""
    value: M
    """The decoded message."""
    mod_revision: int
    """Revision of the last write of this key; compare on it to update without losing writes."""
    create_revision: int
    """Revision at which this incarnation of the key was created."""
    lease: int = 0
    """etcd lease id the key is attached to (0: none); set by `find` and `Txn.get`."""


@dataclass(frozen=True, slots=True)
class Page(Generic[M]):
    """One page of a prefix listing, ordered by key."""

    items: list[Versioned[M]]
    """The values of this page, in key order."""
    next_page_token: str
    """Opaque cursor of the next page; empty at the end of the listing."""
    revision: int
    """Store revision the whole listing reads at (watch from ``revision + 1`` to follow it)."""


@dataclass(frozen=True, slots=True)
class WatchEvent(Generic[M]):
    """One change under a watched prefix."""

    type: Literal["put", "delete"]
    """``put`` for a create or update, ``delete`` for a removal (or a lease expiry)."""
    key: str
    """Key relative to the store root."""
    value: M | None
    """The new value of a put; None for a delete."""
    mod_revision: int
    """Revision of the change; events arrive in increasing order of it."""


@dataclass(frozen=True, slots=True)
class Lease:
    """An etcd lease: keys attached to it vanish when it expires or is revoked."""

    id: int
    """etcd lease id."""
    ttl: int
    """Seconds the lease lives without a refresh, as granted by etcd."""
