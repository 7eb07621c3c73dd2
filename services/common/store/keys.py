"""Key handling: validation, the root prefix, prefix ranges and opaque page tokens.

Keys passed to the store are relative (``compute/instances/<id>``); etcd sees
them under the store root (``/nubis/compute/instances/<id>``). Validation is
a handful of string checks because it runs on every call.
"""

from __future__ import annotations

import base64
import binascii

from services.common import errors

MAX_KEY_LENGTH = 1024
"""Longest relative key accepted; etcd itself allows more, but no nubis key needs it."""

_TOKEN_VERSION = "v1"


def _bad(what: str, value: object, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"invalid store {what} {value!r}: {why}",
        violations=[errors.FieldViolation(what, why)],
        reason="nubis.store.invalid_key",
    )


def _check(what: str, key: object, *, allow_empty: bool) -> str:
    """Explain why `key` is unacceptable (slow path, only reached on bad input)."""
    if not isinstance(key, str):
        raise _bad(what, key, f"must be a string, not {type(key).__name__}")
    if not key and not allow_empty:
        raise _bad(what, key, "must not be empty")
    if ".." in key:
        raise _bad(what, key, "must not contain '..'")
    if key.startswith("/"):
        raise _bad(what, key, "must be relative (no leading '/')")
    if "\x00" in key:
        raise _bad(what, key, "must not contain NUL")
    if "//" in key:
        raise _bad(what, key, "must not contain an empty path segment")
    if len(key) > MAX_KEY_LENGTH:
        raise _bad(what, key, f"longer than {MAX_KEY_LENGTH} characters")
    if not allow_empty and key.endswith("/"):
        raise _bad(what, key, "must not end with '/'")
    return key


def range_end(prefix: bytes) -> bytes:
    """The etcd range_end that covers every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


class Keyspace:
    """Maps relative keys to etcd keys under one root, and back."""

    def __init__(self, root: str) -> None:
        if not isinstance(root, str) or not root.startswith("/") or ".." in root:
            raise _bad("root", root, "must be an absolute path such as '/nubis'")
        self.root = root.rstrip("/")
        self.base = (self.root + "/").encode()
        self._base_len = len(self.base)

    def key(self, key: object) -> bytes:
        """The etcd key of a relative key; InvalidArgument if it is not a proper key."""
        # Fast path first: one type check and a few substring scans.
        if (
            type(key) is str
            and key
            and len(key) <= MAX_KEY_LENGTH
            and key[0] != "/"
            and key[-1] != "/"
            and ".." not in key
            and "//" not in key
            and "\x00" not in key
        ):
            return self.base + key.encode()
        _check("key", key, allow_empty=False)
        raise _bad("key", key, "is not a valid key")  # unreachable in practice

    def prefix(self, prefix: object) -> bytes:
        """The etcd key prefix of a relative prefix ("" is the whole root)."""
        text = _check("prefix", prefix, allow_empty=True)
        return self.base + text.encode()

    def relative(self, full: bytes) -> str:
        """The relative key of an etcd key under this root."""
        return full[self._base_len :].decode()


def encode_page_token(revision: int, last_key: bytes) -> str:
    """An opaque cursor: the read revision and the last key returned."""
    raw = f"{_TOKEN_VERSION}:{revision}:".encode() + last_key
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: object, prefix: bytes) -> tuple[int, bytes]:
    """The (revision, last key) of a cursor made by encode_page_token for `prefix`."""
    if not isinstance(token, str):
        raise _bad("page_token", token, "must be a string")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, revision, last_key = raw.split(b":", 2)
        parsed_revision = int(revision)
    except (ValueError, binascii.Error):
        raise _bad("page_token", token, "is not a token this listing returned") from None
    if version != _TOKEN_VERSION.encode() or parsed_revision < 0:
        raise _bad("page_token", token, "is not a token this listing returned")
    if not last_key.startswith(prefix):
        raise _bad("page_token", token, "belongs to a different listing")
    return parsed_revision, last_key
