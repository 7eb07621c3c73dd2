"""Turn a failed gRPC call into the one line a person reads: `CODE: message (reason)`.

The reason and field violations come from the google.rpc details the servers
attach (ErrorInfo, BadRequest) in the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from services.common import errors

_DETAILS_KEY = "grpc-status-details-bin"


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """`NOT_FOUND: instance 1234 not found (nubis.not_found)`, plus any field violations."""
    code, message = _code_and_message(exc)
    line = f"{code}: {message or 'no message'}"
    status = _status_details(exc)
    if status is None:
        return line
    reason, violations = _read_details(status)
    if violations:
        line += " [" + "; ".join(violations) + "]"
    if reason:
        line += f" ({reason})"
    return line


def error_reason(exc: grpc.RpcError) -> str:
    """The stable ErrorInfo reason of a failed call (`nubis.quota.exceeded`), or ""."""
    status = _status_details(exc)
    return _read_details(status)[0] if status is not None else ""


def _code_and_message(exc: grpc.RpcError) -> tuple[str, str]:
    # grpc.aio.AioRpcError is no grpc.Call, yet both offer code() and details().
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        code = exc.code()
        return (code.name if code is not None else "UNKNOWN"), (exc.details() or "")
    return "UNKNOWN", str(exc)


def describe_domain_error(exc: errors.NubisError) -> str:
    """A local (non-RPC) domain error in the same shape."""
    line = exc.message
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        line += " [" + "; ".join(f"{v.field}: {v.description}" for v in exc.violations) + "]"
    return f"{line} ({exc.reason})"


def _status_details(exc: grpc.RpcError) -> status_pb2.Status | None:
    if not isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        return None
    trailers: Iterable[tuple[str, str | bytes]] = exc.trailing_metadata() or ()
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:
                return None
    return None


def _read_details(status: status_pb2.Status) -> tuple[str, list[str]]:
    reason = ""
    violations: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [f"{v.field}: {v.description}" for v in bad.field_violations]
    return reason, violations
