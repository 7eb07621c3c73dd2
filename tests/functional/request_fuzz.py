"""Hostile requests for any RPC, built from its input message descriptor, and their checks.

`RequestStrategies` turns a message descriptor into a hypothesis strategy of
messages full of the input a careless client or an attacker sends: unicode,
control characters, NULs, ``../``, strings over 100 kB, integers at the edges
of their type, enum numbers nobody defined, field masks naming unknown or
read-only paths, garbage page tokens and filters, and, for fields that carry
ids, the ids of real resources so a request gets past NOT_FOUND into the
deeper checks. `call_raw` sends serialized bytes to any method (of any
streaming kind), so bytes that do not decode can be sent too; `Outcome`
holds the status and its google.rpc details. `snapshot` reads every key
under the store root as raw protobuf, for before/after comparisons.
"""

from __future__ import annotations

import base64
import string
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.protobuf import (
    descriptor,
    empty_pb2,
    field_mask_pb2,
    message,
    message_factory,
    timestamp_pb2,
    unknown_fields,
)
from google.rpc import error_details_pb2, status_pb2
from hypothesis import strategies as st

from services.common.store import Store

FD = descriptor.FieldDescriptor
# Message fields nest at most this deep; below it they stay unset.
MAX_DEPTH = 3
# Every call is bounded, so a server that hangs on some input fails the test.
CALL_TIMEOUT = 10.0
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Codes that mean the server failed, not the request: never an answer to bad input.
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED})
TRACEBACK_MARKERS = ("Traceback", 'File "')

HUGE = "x" * 100_001
HUGE_UNICODE = "é∂😀" * 30_000
# Strings that break naive code: paths, separators, NULs, escapes, bidi, formats.
NASTY_STRINGS: tuple[str, ...] = (
    "", " ", ".", "..", "../", "../../etc/passwd", "a/../b", "/", "//", "a/b", "\\",
    "\x00", "a\x00b", "\n", "\r\n", "\t", "\x1b[31m", "\x7f", "\u202e", "\ufeff", "\u200b",
    "a\n", "name\n", "\nname", "%s%n%x", "{}", "{0}", "${HOME}", "'; --", "\"", "*", "_cloud",
    "-1", "0",
    "😀", "ﬁ", "İ", "a" * 63,
    "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "identity/projects/", "nodes/", "\ufffd",
)
# Past every length limit: names (63), labels (255), store keys (1024), headers (16 KiB).
LONG_STRINGS: tuple[str, ...] = ("a" * 64, "a" * 256, "é" * 600, "x" * 1025, HUGE, HUGE_UNICODE)
GARBAGE_FILTERS: tuple[str, ...] = (
    "=", "name=", "= x", "name = \"unterminated", "name == x", "(((", ")", "AND", "a AND",
    "labels.", "labels.x", "labels.=1", "name = 1 OR", "state = NO_SUCH_STATE",
    "meta.name = \"x\"", "no_such_field = \"x\"", "name:\"x\"", "name = \"x\" AND name = \"y\"",
    "name = \x00", "name = \"" + HUGE + "\"", "NOT", "-name", "name < 3", "name = 'x'",
)
GARBAGE_TOKENS: tuple[str, ...] = (
    "!!!", "====", "a", "AAAA", "AAAAAAAAAAAAAAAAAAAA", "eyJ9", "eyJhIjoxfQ", "bnViaXM",
    base64.urlsafe_b64encode(b"\x00" * 40).decode(), base64.b64encode(b"\xff" * 17).decode(),
    base64.urlsafe_b64encode(b'{"revision": -1, "key": "../"}').decode(),
    base64.urlsafe_b64encode(b"999999999999999999999999:/nubis").decode(), HUGE,
)
# Mask paths every update must refuse: unknown, read-only, malformed.
BAD_MASK_PATHS: tuple[str, ...] = (
    "", "*", "meta", "meta.id", "meta.project_id", "meta.create_time", "meta.update_time",
    "meta.revision", "id", "project_id", "password", "state", "meta.labels.x", "no_such_field",
    "meta..name", ".name", "name.", "a.b.c.d.e", "../", "\x00", "META.NAME", "x" * 1000,
)
_INT_RANGES: Mapping[int, tuple[int, int]] = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
# Byte strings that are not a valid encoding of any message with a string field 1.
MALFORMED: tuple[bytes, ...] = (
    b"\xff", b"\x08", b"\x0f", b"\x0a\xff\x01", b"\x0a\x05ab", b"\x0a\x02\xc3\x28",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x0b", b"\x0c", b"\x07\x00",
    b"\x0a\x01\xff", b"\x12\x03\xed\xa0\x80",
)


def _one_of(values: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """Draw from `values` by index, so no strategy repr ever spells out a 100 kB string."""
    return st.integers(0, len(values) - 1).map(values.__getitem__)


def _text() -> st.SearchStrategy[str]:
    # Lone surrogates cannot be encoded as UTF-8, so no client can send them.
    return st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def _inner(fd: descriptor.FieldDescriptor) -> descriptor.Descriptor:
    """The message type of a message field."""
    assert fd.message_type is not None, fd.full_name
    return fd.message_type


def _enum(fd: descriptor.FieldDescriptor) -> descriptor.EnumDescriptor:
    assert fd.enum_type is not None, fd.full_name
    return fd.enum_type


def _is_map(fd: descriptor.FieldDescriptor) -> bool:
    return (fd.type == FD.TYPE_MESSAGE and fd.message_type is not None
            and _inner(fd).GetOptions().map_entry)


@dataclass
class RequestStrategies:
    """Strategies of hostile messages; `ids` and `names` name real resources to aim at."""

    ids: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    _cache: dict[str, st.SearchStrategy[message.Message]] = field(default_factory=dict)

    def request(self, desc: descriptor.Descriptor) -> st.SearchStrategy[message.Message]:
        return self.of_message(desc, 0, mask_paths=self._mask_paths(desc))

    def of_message(self, desc: descriptor.Descriptor, depth: int,
                   mask_paths: tuple[str, ...] = ()) -> st.SearchStrategy[message.Message]:
        key = f"{desc.full_name}@{depth}"
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        cls = message_factory.GetMessageClass(desc)
        fields = {fd.name: self._field(fd, depth, mask_paths) for fd in desc.fields
                  if fd.type != FD.TYPE_MESSAGE or depth < MAX_DEPTH}
        built = st.fixed_dictionaries({}, optional=fields).map(
            lambda values: _build(cls, desc, values))
        self._cache[key] = built
        return built

    def _field(self, fd: descriptor.FieldDescriptor, depth: int,
               mask_paths: tuple[str, ...]) -> st.SearchStrategy[Any]:
        if _is_map(fd):
            entry = _inner(fd)
            return st.dictionaries(self._single(entry.fields_by_name["key"], depth, mask_paths),
                                   self._single(entry.fields_by_name["value"], depth, mask_paths),
                                   max_size=4)
        single = self._single(fd, depth, mask_paths)
        if fd.is_repeated:
            return st.lists(single, max_size=4)
        return single

    def _single(self, fd: descriptor.FieldDescriptor, depth: int,
                mask_paths: tuple[str, ...]) -> st.SearchStrategy[Any]:
        if fd.type == FD.TYPE_MESSAGE:
            return self._submessage(_inner(fd), depth, mask_paths)
        if fd.type == FD.TYPE_STRING:
            return self._string(fd.name)
        if fd.type == FD.TYPE_BYTES:
            return st.binary(max_size=64) | _one_of((HUGE.encode(),))
        if fd.type == FD.TYPE_BOOL:
            return st.booleans()
        if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            return st.floats(width=32) if fd.type == FD.TYPE_FLOAT else st.floats()
        if fd.type == FD.TYPE_ENUM:
            known = [value.number for value in _enum(fd).values]
            return st.sampled_from(known) | st.integers(-(2**31), 2**31 - 1)
        low, high = _INT_RANGES[fd.type]
        return st.sampled_from((low, high, 0, -1 if low else 1, 1)) | st.integers(low, high)

    def _submessage(self, desc: descriptor.Descriptor, depth: int,
                    mask_paths: tuple[str, ...]) -> st.SearchStrategy[Any]:
        if desc.full_name == field_mask_pb2.FieldMask.DESCRIPTOR.full_name:
            paths = _one_of(mask_paths + BAD_MASK_PATHS) | _text()
            return st.lists(paths, max_size=4).map(lambda p: field_mask_pb2.FieldMask(paths=p))
        if desc.full_name == timestamp_pb2.Timestamp.DESCRIPTOR.full_name:
            seconds = st.sampled_from((-(2**63), 2**63 - 1, -1, 0, 253402300800))
            nanos = st.sampled_from((-1, 0, 999_999_999, 1_000_000_000, 2**31 - 1))
            return st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)
        return self.of_message(desc, depth + 1)

    def _string(self, name: str) -> st.SearchStrategy[str]:
        # Separate branches, so over-long strings are drawn as often as the rest.
        general = _one_of(LONG_STRINGS) | _one_of(NASTY_STRINGS) | _text()
        if name == "filter":
            return _one_of(GARBAGE_FILTERS) | general
        if name == "page_token":
            return _one_of(GARBAGE_TOKENS) | general
        aimed = tuple(self.ids if name == "id" or name.endswith(("_id", "_ids")) else ())
        aimed += tuple(self.names) if name in ("name", "username", "project", "node") else ()
        # A real id or name with a stray newline or space is a different, invalid one.
        aimed += tuple(value + "\n" for value in aimed) + tuple(" " + value for value in aimed)
        if aimed:
            return _one_of(aimed) | st.uuids().map(str) | general
        return general

    @staticmethod
    def _mask_paths(desc: descriptor.Descriptor) -> tuple[str, ...]:
        """Real field names of the resource an update request carries, to mix with bad ones."""
        paths: list[str] = []
        for fd in desc.fields:
            if fd.type == FD.TYPE_MESSAGE and not _is_map(fd) and fd.message_type is not None:
                for inner in _inner(fd).fields:
                    paths.append(inner.name)
                    if inner.name == "meta" and inner.message_type is not None:
                        paths.extend(f"meta.{meta.name}" for meta in inner.message_type.fields)
        return tuple(sorted(set(paths)))


    def one_bad_field(self, seed: message.Message) -> st.SearchStrategy[message.Message]:
        """`seed` (a valid request) with one field, at any depth, set to a hostile value.

        Bugs hide behind the first check a request fails; a valid request with a
        single bad field reaches the checks after it.
        """
        desc = cast(descriptor.Descriptor, seed.DESCRIPTOR)
        mask_paths = self._mask_paths(desc)
        targets = list(_field_paths(desc, ()))
        if not targets:
            return st.just(seed)

        def mutate(index: int) -> st.SearchStrategy[message.Message]:
            path, fd = targets[index]
            return self._field(fd, len(path), mask_paths).map(
                lambda value: _replaced(seed, path, fd, value))

        return st.integers(0, len(targets) - 1).flatmap(mutate)


_OPAQUE = (field_mask_pb2.FieldMask.DESCRIPTOR.full_name,
           timestamp_pb2.Timestamp.DESCRIPTOR.full_name)


def _field_paths(desc: descriptor.Descriptor, prefix: tuple[str, ...]
                 ) -> Iterable[tuple[tuple[str, ...], descriptor.FieldDescriptor]]:
    """Every field reachable through singular message fields, as (path, field)."""
    for fd in desc.fields:
        path = (*prefix, fd.name)
        yield path, fd
        nested = (fd.type == FD.TYPE_MESSAGE and not fd.is_repeated
                  and _inner(fd).full_name not in _OPAQUE)
        if nested and len(path) < MAX_DEPTH:
            yield from _field_paths(_inner(fd), path)


def _replaced(seed: message.Message, path: tuple[str, ...], fd: descriptor.FieldDescriptor,
              value: Any) -> message.Message:
    copy = type(seed)()
    copy.CopyFrom(seed)
    parent = copy
    for name in path[:-1]:
        parent = getattr(parent, name)
    parent.ClearField(fd.name)
    _assign(parent, fd, value)
    return copy


def _assign(target_message: message.Message, fd: descriptor.FieldDescriptor,
            value: Any) -> None:
    target = getattr(target_message, fd.name)
    if _is_map(fd):
        value_fd = _inner(fd).fields_by_name["value"]
        for key, item in value.items():
            if value_fd.type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif fd.is_repeated:
        if fd.type == FD.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif fd.type == FD.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(target_message, fd.name, value)


def _build(cls: type[message.Message], desc: descriptor.Descriptor,
           values: Mapping[str, Any]) -> message.Message:
    built = cls()
    for name, value in values.items():
        _assign(built, desc.fields_by_name[name], value)
    return built


def garbage_bytes() -> st.SearchStrategy[bytes]:
    """Known-malformed encodings and random bytes (which may or may not decode)."""
    return _one_of(MALFORMED) | st.binary(min_size=1, max_size=64)


@dataclass(frozen=True)
class Outcome:
    """The status of one call and the google.rpc details it carried."""

    code: grpc.StatusCode
    details: str
    error_info: tuple[error_details_pb2.ErrorInfo, ...] = ()
    bad_request: tuple[error_details_pb2.BadRequest, ...] = ()

    def problems(self) -> list[str]:
        """What is wrong with this answer to bad input (empty when it is a clean answer)."""
        found = []
        if self.code in SERVER_FAULTS:
            found.append(f"server fault {self.code.name}")
        found.extend(f"traceback text {marker!r} in details" for marker in TRACEBACK_MARKERS
                     if marker in self.details)
        # Every nubis status carries an ErrorInfo; one without it came from the
        # transport (say, a status too big to send) and hides the real error.
        if self.code != grpc.StatusCode.OK and not any(info.reason for info in self.error_info):
            found.append(f"{self.code.name} without an ErrorInfo reason")
        return found

    @property
    def reasons(self) -> set[str]:
        return {info.reason for info in self.error_info}


def _outcome(exc: grpc.aio.AioRpcError) -> Outcome:
    infos: list[error_details_pb2.ErrorInfo] = []
    bad: list[error_details_pb2.BadRequest] = []
    for key, value in exc.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                request = error_details_pb2.BadRequest()
                detail.Unpack(request)
                bad.append(request)
    return Outcome(exc.code(), exc.details() or "", tuple(infos), tuple(bad))


def _same(data: bytes) -> bytes:
    return data


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def call_raw(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor,
                   payload: bytes, metadata: Iterable[tuple[str, str]]) -> Outcome:
    """Send `payload` as the only request message of `method`; a stream is read to one reply."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind: Callable[..., Any] = {
        (False, False): channel.unary_unary, (False, True): channel.unary_stream,
        (True, False): channel.stream_unary, (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    stub = kind(path, request_serializer=_same, response_deserializer=_same)
    request = _one(payload) if method.client_streaming else payload
    call = stub(request, metadata=tuple(metadata), timeout=CALL_TIMEOUT)
    try:
        if method.server_streaming:
            # A watch that accepts the request streams on: its first reply is enough.
            async for _reply in call:
                break
            call.cancel()
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return _outcome(exc)
    return Outcome(grpc.StatusCode.OK, "")


async def call_raw_stream(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor,
                          payloads: Sequence[bytes],
                          metadata: Iterable[tuple[str, str]]) -> Outcome:
    """Send `payloads` as the request stream of a client-streaming `method` (an upload)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    stub = channel.stream_unary(path, request_serializer=_same, response_deserializer=_same)
    try:
        await stub(iter(payloads), metadata=tuple(metadata), timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return _outcome(exc)
    return Outcome(grpc.StatusCode.OK, "")


async def snapshot(store: Store) -> dict[str, bytes]:
    """Every key under the store root and its value, read as raw protobuf."""
    # Empty keeps every field as an unknown field and writes it back unchanged,
    # so equal bytes here mean equal stored values; a value that is not valid
    # protobuf at all fails the read.
    items, _revision = await store.list_all("", empty_pb2.Empty)
    return {item.key: item.value.SerializeToString() for item in items}


def decode_problems(key: str, raw: bytes,
                    types: Mapping[str, tuple[type[message.Message], ...]]) -> list[str]:
    """Why the stored `raw` at `key` is not a clean record of its prefix's type(s)."""
    if any(ord(char) < 0x20 or char == "\x7f" for char in key):
        return [f"{key!r}: control character in key"]
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return [f"{key!r}: empty, '.' or '..' path segment"]
    prefix = max((p for p in types if key.startswith(p)), key=len, default=None)
    if prefix is None:
        return []
    failures = []
    for msg_type in types[prefix]:
        try:
            decoded = msg_type.FromString(raw)
        except message.DecodeError as exc:
            failures.append(f"not a {msg_type.__name__} ({exc})")
            continue
        if len(unknown_fields.UnknownFieldSet(decoded)) == 0:
            return []
        failures.append(f"{msg_type.__name__} with unknown fields")
    return [f"{key!r}: " + "; ".join(failures)]


def printable(data: bytes) -> str:
    """Short, safe rendering of a payload for assertion messages."""
    shown = "".join(chr(b) if chr(b) in string.printable[:-5] else "." for b in data[:80])
    return f"{shown}{'...' if len(data) > 80 else ''} ({len(data)} bytes)"
