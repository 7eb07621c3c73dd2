"""The `filter` of List and Watch requests (docs/api.md): parse once, match each record.

Syntax: space-separated ``key=value`` terms, all of which must match; a comma
in a value means "any of" (``state=ACTIVE,ERROR``); ``label.<key>`` matches a
label. Each List declares its keys and, where the values are closed (enums),
the allowed values. Anything else is INVALID_ARGUMENT naming the bad term.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import NoReturn

from google.protobuf import descriptor

from services.common import errors

LABEL_PREFIX = "label."
# Long enough for any honest filter; bounds the work one request can ask for.
MAX_LENGTH = 2048
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")

# Keys of one List: key -> allowed values, or None for any non-empty string.
Keys = Mapping[str, Collection[str] | None]


@dataclass(frozen=True)
class Term:
    """One ``key=value[,value...]`` term: the record's `key` must be one of `values`."""

    key: str
    values: frozenset[str]


@dataclass(frozen=True)
class Filter:
    """A parsed filter; the empty filter matches everything."""

    terms: tuple[Term, ...] = ()

    def matches(self, fields: Mapping[str, str], labels: Mapping[str, str] | None = None) -> bool:
        """Whether a record with these field values (and labels) passes every term."""
        for term in self.terms:
            if term.key.startswith(LABEL_PREFIX):
                value = (labels or {}).get(term.key[len(LABEL_PREFIX):])
            else:
                value = fields.get(term.key)
            if value is None or value not in term.values:
                return False
        return True

    def values(self, key: str) -> frozenset[str] | None:
        """The values every match must take for `key` (intersection), None if unconstrained.

        Lets a List narrow what it reads (e.g. one user's role assignments).
        """
        chosen: frozenset[str] | None = None
        for term in self.terms:
            if term.key == key:
                chosen = term.values if chosen is None else chosen & term.values
        return chosen


def parse(text: str, keys: Keys, *, labels: bool = True, field: str = "filter") -> Filter:
    """The filter `text` over `keys` (plus ``label.<key>`` if `labels`), or INVALID_ARGUMENT."""
    if len(text) > MAX_LENGTH:
        _reject(field, f"at most {MAX_LENGTH} characters")
    terms = [_term(word, keys, labels, field) for word in text.split()]
    return Filter(tuple(terms))


def _term(word: str, keys: Keys, labels: bool, field: str) -> Term:
    key, sep, raw = word.partition("=")
    known = ", ".join(sorted(keys)) + (", label.<key>" if labels else "")
    if not sep or not key:
        _reject(field, f"{word!r} is not key=value (keys: {known})")
    values = raw.split(",")
    if any(not value for value in values):
        _reject(field, f"{word!r} has an empty value")
    if key.startswith(LABEL_PREFIX) and labels:
        if not _LABEL_KEY.fullmatch(key[len(LABEL_PREFIX):]):
            _reject(field, f"{key!r} is not a valid label key")
        return Term(key, frozenset(values))
    if not _KEY.fullmatch(key) or key not in keys:
        _reject(field, f"unknown key {key!r} (keys: {known})")
    allowed = keys[key]
    if allowed is not None:
        bad = [value for value in values if value not in allowed]
        if bad:
            _reject(field, f"{key}={bad[0]} is not one of: {', '.join(sorted(allowed))}")
    return Term(key, frozenset(values))


def _reject(field: str, description: str) -> NoReturn:
    raise errors.InvalidArgument(
        f"invalid filter: {description}",
        violations=[errors.FieldViolation(field, description)],
        reason="nubis.filter.invalid",
    )


def enum_names(enum: descriptor.EnumDescriptor) -> dict[str, int]:
    """Filter spellings of an enum's values: without the type prefix, zero value left out.

    ``DiskFormat.DISK_FORMAT_QCOW2`` is written ``QCOW2``; a nested ``State``
    whose values carry no prefix (``ACTIVE``) is written as is.
    """
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    names: dict[str, int] = {}
    for value in enum.values:
        if value.number == 0:
            continue
        names[value.name.removeprefix(prefix)] = value.number
    return names


def enum_name(enum: descriptor.EnumDescriptor, number: int) -> str:
    """The filter spelling of one value of `enum` ("" for the zero value)."""
    for name, value in enum_names(enum).items():
        if value == number:
            return name
    return ""
