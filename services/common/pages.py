"""Paging of List RPCs (docs/api.md): page sizes, opaque page tokens, filtered pages.

A listing read from the store pages on the store's own cursor
(`filtered_page`); a listing built in memory (a project's members, the node
cache) pages by the sort key of its last item (`page_of`), in a token tagged
with the listing's name, so a token of one listing is refused by another.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

from google.protobuf import message

from services.common import errors
from services.common.store import Store, Versioned

M = TypeVar("M", bound=message.Message)
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
# Bounds what one request can make the server read and send.
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to serve: 0 is the default, more than the maximum is the maximum."""
    if requested < 0:
        raise errors.InvalidArgument(
            "page_size must not be negative",
            violations=[errors.FieldViolation("page_size", "must not be negative")],
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def token(listing: str, cursor: str) -> str:
    """An opaque token for the page after `cursor` (the last name or id returned)."""
    return base64.urlsafe_b64encode(f"{listing}:{cursor}".encode()).decode().rstrip("=")


def cursor(page_token: str, listing: str, well_formed: Callable[[str], bool]) -> str:
    """The cursor a `page_token` of `listing` carries ("" for the first page).

    Anything else — not base64, another listing's token, a cursor that is no
    name or id at all — is INVALID_ARGUMENT rather than a silently empty page.
    """
    if not page_token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(page_token + "=" * (-len(page_token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    tag, _, found = raw.partition(":")
    if tag != listing or not well_formed(found):
        raise errors.InvalidArgument(
            "page_token is not a token this listing returned",
            violations=[errors.FieldViolation("page_token", "not from this listing")],
        )
    return found


def page_of(items: Sequence[T], key: Callable[[T], str], *, size: int, page_token: str,
            listing: str, well_formed: Callable[[str], bool]) -> tuple[list[T], str]:
    """One page of an in-memory list sorted by `key`, and the next page's token.

    The token carries the key of the last item returned; `well_formed` says
    which keys a token of `listing` may carry.
    """
    after = cursor(page_token, listing, well_formed)
    rest = [item for item in items if key(item) > after]
    page = rest[:size]
    next_token = token(listing, key(page[-1])) if len(rest) > size else ""
    return page, next_token


async def filtered_page(
    store: Store, prefix: str, msg_type: type[M], keep: Callable[[Versioned[M]], bool], *,
    size: int, page_token: str,
) -> tuple[list[Versioned[M]], str]:
    """Up to `size` records under `prefix` that `keep` accepts, and the next page's token.

    Each read asks only for what is still missing, so the store's cursor after
    the last read is exactly the cursor after the last record returned.
    """
    found: list[Versioned[M]] = []
    next_token = page_token
    while True:
        page = await store.list(prefix, msg_type, page_size=size - len(found),
                                page_token=next_token)
        found += [item for item in page.items if keep(item)]
        next_token = page.next_page_token
        if not next_token or len(found) >= size:
            return found, next_token
