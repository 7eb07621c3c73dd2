"""The shared List filter: syntax, matching, enum spellings and every kind of bad input."""

from __future__ import annotations

import pytest
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, filtering

KEYS: filtering.Keys = {"name": None, "state": ("ACTIVE", "ERROR", "DELETED")}


def test_all_terms_must_match_and_comma_means_any_of() -> None:
    parsed = filtering.parse("name=web-1 state=ACTIVE,ERROR label.env=prod", KEYS)
    record = {"name": "web-1", "state": "ERROR"}
    assert parsed.matches(record, {"env": "prod"})
    assert not parsed.matches(record, {"env": "dev"})
    assert not parsed.matches(record, {})
    assert not parsed.matches({"name": "web-1", "state": "DELETED"}, {"env": "prod"})
    assert not parsed.matches({"name": "web-2", "state": "ACTIVE"}, {"env": "prod"})


def test_empty_filter_matches_everything() -> None:
    assert filtering.parse("", KEYS).matches({})
    assert filtering.parse("   ", KEYS).terms == ()


def test_values_intersects_repeated_keys() -> None:
    parsed = filtering.parse("state=ACTIVE,ERROR state=ERROR,DELETED", KEYS)
    assert parsed.values("state") == frozenset({"ERROR"})
    assert parsed.values("name") is None


@pytest.mark.parametrize("text", [
    "name",                 # no '='
    "=web",                 # no key
    "name=",                # empty value
    "state=ACTIVE,",        # empty alternative
    "colour=red",           # unknown key
    "Name=web",             # keys are lowercase
    "state=RUNNING",        # not an allowed value
    "label.=x",             # empty label key
    "label.a b=x",          # split into two terms; "b=x" is unknown
    "name=" + "x" * 3000,   # too long
])
def test_bad_filters_are_invalid_argument(text: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        filtering.parse(text, KEYS)
    assert caught.value.reason == "nubis.filter.invalid"
    assert [v.field for v in caught.value.violations] == ["filter"]


def test_labels_can_be_turned_off() -> None:
    with pytest.raises(errors.InvalidArgument):
        filtering.parse("label.env=prod", KEYS, labels=False)


def test_enum_names_drop_the_type_prefix_and_the_zero_value() -> None:
    state = identity_pb2.Project.State.DESCRIPTOR
    assert filtering.enum_names(state) == {"ENABLED": 1, "DISABLED": 2}
    assert filtering.enum_name(state, 2) == "DISABLED"
    assert filtering.enum_name(state, 0) == ""
    event = resource_pb2.EventType.DESCRIPTOR
    assert filtering.enum_names(event)["ADDED"] == resource_pb2.EVENT_TYPE_ADDED
