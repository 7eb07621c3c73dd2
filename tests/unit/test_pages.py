"""Page sizes and in-memory pages with tokens tagged by their listing."""

from __future__ import annotations

import pytest

from services.common import errors, pages, resources


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert pages.page_size(0) == pages.DEFAULT_PAGE_SIZE
    assert pages.page_size(7) == 7
    assert pages.page_size(10**9) == pages.MAX_PAGE_SIZE
    with pytest.raises(errors.InvalidArgument) as raised:
        pages.page_size(-1)
    assert raised.value.message == "page_size must not be negative"
    assert raised.value.violations[0].field == "page_size"


def test_page_of_walks_every_item_once_in_order() -> None:
    ids = sorted(resources.new_id() for _ in range(7))
    seen: list[str] = []
    token = ""
    while True:
        page, token = pages.page_of(ids, str, size=3, page_token=token, listing="users",
                                    well_formed=resources.is_uuid)
        seen += page
        if not token:
            break
    assert seen == ids


def test_an_exact_last_page_has_no_token() -> None:
    page, token = pages.page_of(["a", "b"], str, size=2, page_token="", listing="x",
                                well_formed=str.isalpha)
    assert (page, token) == (["a", "b"], "")


@pytest.mark.parametrize("bad", [
    "%%%", pages.token("nodes", "node-1"), pages.token("users", "not-a-uuid"), "dXNlcnM",
])
def test_a_token_not_from_this_listing_is_invalid_argument(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument) as raised:
        pages.page_of([], str, size=1, page_token=bad, listing="users",
                      well_formed=resources.is_uuid)
    assert raised.value.message == "page_token is not a token this listing returned"
    assert raised.value.violations[0].field == "page_token"


def test_cursor_round_trips() -> None:
    assert pages.cursor(pages.token("nodes", "n-1"), "nodes", bool) == "n-1"
    assert pages.cursor("", "nodes", bool) == ""
