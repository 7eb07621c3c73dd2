"""The authorization matrix: one declarative row per RPC, extended by every service.

A row names the RPC, how to build its request against the `World`, and the
status each valid caller must get. Every non-public row is also checked
against the refused tokens (none, expired, forged, tampered, revoked →
UNAUTHENTICATED), so a row only states what differs between callers. A
service adds its rows in ``rows_<service>.py`` in this package with
`add_rows`, and its server with `add_service` so the matrix can start it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import message

from tests.functional.authz.world import CALLERS, Service, World

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
HIDDEN = grpc.StatusCode.NOT_FOUND

# A client-streaming RPC may be sent a sequence of messages.
RequestFactory = Callable[[World], Awaitable[message.Message | Sequence[message.Message]]]
ResultCheck = Callable[[World, str, message.Message], None]


@dataclass(frozen=True)
class Row:
    """One RPC (or one variant of it, named by `case`) and the code each caller gets."""

    service: str
    method: str
    request: RequestFactory
    expect: Mapping[str, grpc.StatusCode]
    case: str = ""
    public: bool = False
    # Extra assertion on successful replies (e.g. a List shows no other project's items).
    check: ResultCheck | None = None

    @property
    def name(self) -> str:
        short = self.service.rsplit(".", 1)[-1]
        return f"{short}.{self.method}" + (f"[{self.case}]" if self.case else "")


# Full service name → how to start it in-process against the world's store and
# settings (identity is always up). The matrix starts each once per module.
ServiceStarter = Callable[[World], Awaitable[Service]]
SERVICES: dict[str, ServiceStarter] = {}


def add_service(full_name: str, starter: ServiceStarter) -> None:
    SERVICES[full_name] = starter


ROWS: list[Row] = []


def add_rows(*rows: Row) -> None:
    for row in rows:
        missing = set(CALLERS) - set(row.expect)
        if missing and not row.public:
            raise ValueError(f"row {row.name} gives no expectation for {sorted(missing)}")
        ROWS.append(row)


def expect(*, cloud_admin: grpc.StatusCode = OK, a_admin: grpc.StatusCode = OK,
           a_member: grpc.StatusCode = OK, a_reader: grpc.StatusCode = OK,
           b_admin: grpc.StatusCode = OK) -> dict[str, grpc.StatusCode]:
    """Expected codes per caller; the resources a row touches belong to project A."""
    return {"cloud_admin": cloud_admin, "a_admin": a_admin, "a_member": a_member,
            "a_reader": a_reader, "b_admin": b_admin}


# Shorthands for the common shapes of a row's expectations.
def project_read() -> dict[str, grpc.StatusCode]:
    """Anyone in project A (and cloud-admin) reads; project B gets NOT_FOUND."""
    return expect(b_admin=HIDDEN)


def project_write(role: str = "member") -> dict[str, grpc.StatusCode]:
    """Project A members (or admins) write; readers are denied; project B gets NOT_FOUND."""
    return expect(a_member=OK if role == "member" else DENIED, a_reader=DENIED, b_admin=HIDDEN)


def cloud_only() -> dict[str, grpc.StatusCode]:
    return expect(a_admin=DENIED, a_member=DENIED, a_reader=DENIED, b_admin=DENIED)
