"""Read a failed gRPC call: the one line a person reads, or the domain error it stands for.

`describe_rpc_error` gives `CODE: message (reason)`; `domain_error` turns a
callee's status back into the services.common.errors class it was made from
(services.common.server.status is the other direction), so a service that
calls another re-raises the callee's NOT_FOUND as NotFound, never INTERNAL.
The reason, metadata and field violations come from the google.rpc details
the servers attach (ErrorInfo, BadRequest) in the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from services.common import errors

_DETAILS_KEY = "grpc-status-details-bin"

# The failed call each domain error of `domain_error` was made from (dropped with the error).
_FROM_CALL: weakref.WeakKeyDictionary[errors.NubisError, grpc.RpcError] = (
    weakref.WeakKeyDictionary())

# The domain error each code stands for (the inverse of status._CODES).
_DOMAIN_ERRORS: Mapping[grpc.StatusCode, type[errors.NubisError]] = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.ABORTED: errors.Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}
# Codes that say the callee could not answer in time or at all: the caller is
# told the service is unavailable (and may retry), whatever the callee was doing.
_UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.CANCELLED})


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


# The address grpc names in a failed connection ("ipv4:127.0.0.1:7504: Failed to connect").
_ADDRESS = re.compile(r"(?:ipv[46]|dns):(?:///)?(\[[^\]]+\]:\d+|[\w.-]+:\d+)")
_LOGIN_HINT = "run `nubis login` (or set NUBIS_TOKEN)"
# A login refused: logging in again is the thing that failed, so the hint is what to check.
_BAD_LOGIN = "nubis.auth.invalid_credentials"
_BAD_LOGIN_HINT = "check the user name, password and project"


def fix_for(code: str, message: str, reason: str = "") -> str:
    """What a person does about a failure with `code`, when one fix is known; else ""."""
    if reason == _BAD_LOGIN:
        return _BAD_LOGIN_HINT
    if code == "UNAUTHENTICATED":
        return _LOGIN_HINT
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        found = _ADDRESS.search(message)
        where = f"at {found.group(1)}" if found else "there"
        return (f"no nubis service answers {where}; start one with `nubis lab up` "
                "(or point --identity / --cloud at your cloud)")
    return ""


def failure_document(exc: grpc.RpcError) -> dict[str, Any]:
    """A failed call as data: code, reason, message, field violations and the fix if known."""
    code, message = _code_and_message(exc)
    status = _status_details(exc)
    reason = _error_info(status).reason
    fields = [{"field": v.field, "description": v.description} for v in _violations(status)]
    return {"code": code, "reason": reason, "message": message, "field_violations": fields,
            "fix": fix_for(code, message, reason)}


def domain_failure_document(exc: errors.NubisError) -> dict[str, Any]:
    """A local domain error in the shape of `failure_document`."""
    fields = [{"field": v.field, "description": v.description}
              for v in (exc.violations if isinstance(exc, errors.InvalidArgument) else ())]
    code = _code_of(exc)
    return {"code": code, "reason": exc.reason, "message": exc.message,
            "field_violations": fields, "fix": _local_fix(exc)}


def _code_of(exc: errors.NubisError) -> str:
    return exc.code  # the status name each class (or domain_error) gives


def describe_failure(exc: grpc.RpcError) -> str:
    """The one line a person reads: `describe_rpc_error`, then the fix when one is known.
    A connection failure is told without grpc's wording; `--debug` shows that."""
    code, message = _code_and_message(exc)
    fix = fix_for(code, message, _error_info(_status_details(exc)).reason)
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and fix:
        return f"{code}: {fix}"
    line = describe_rpc_error(exc)
    return f"{line}; {fix}" if fix else line


def debug_details(exc: grpc.RpcError) -> str:
    """Everything grpc tells about a failed call, for `--debug`."""
    code, message = _code_and_message(exc)
    lines = [f"grpc code: {code}", f"grpc details: {message}"]
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        debug = exc.debug_error_string() if isinstance(exc, grpc.aio.AioRpcError) else ""
        if debug:
            lines.append(f"grpc debug: {debug}")
        for key, value in exc.trailing_metadata() or ():
            if key != _DETAILS_KEY:
                lines.append(f"trailer {key}: {value!r}")
    status = _status_details(exc)
    if status is not None:
        lines += [f"detail: {detail.TypeName()}" for detail in status.details]
    return "\n".join(lines)


def error_reason(exc: grpc.RpcError) -> str:
    """The stable ErrorInfo reason of a failed call (`nubis.quota.exceeded`), or ""."""
    status = _status_details(exc)
    return _read_details(status)[0] if status is not None else ""


def domain_error(exc: grpc.RpcError, service: str) -> errors.NubisError:
    """The domain error a failed call to `service` stands for, with the callee's reason,
    metadata and field violations (UNAVAILABLE and DEADLINE_EXCEEDED: Unavailable naming
    `service`; a code no domain error makes: a bare NubisError, a server fault).

    The call's own error stays known (`rpc_error_of`), so the CLI prints it as it was."""
    failure = _domain_error(exc, service)
    _FROM_CALL[failure] = exc
    return failure


def rpc_error_of(exc: errors.NubisError) -> grpc.RpcError | None:
    """The failed call `exc` was made from by `domain_error`, or None (a local error)."""
    return _FROM_CALL.get(exc)


def describe_error(exc: errors.NubisError) -> str:
    """The one line a person reads about `exc`: a failed call's as `describe_failure`
    tells it, a local error's as `describe_domain_error`."""
    call = rpc_error_of(exc)
    return describe_failure(call) if call is not None else describe_domain_error(exc)


def error_document(exc: errors.NubisError) -> dict[str, Any]:
    """`exc` as data: `failure_document` of its call, else `domain_failure_document`."""
    call = rpc_error_of(exc)
    return failure_document(call) if call is not None else domain_failure_document(exc)


def _domain_error(exc: grpc.RpcError, service: str) -> errors.NubisError:
    code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None
    message = _code_and_message(exc)[1] or "no message"
    status = _status_details(exc)
    info = _error_info(status)
    reason = info.reason or None
    metadata = dict(info.metadata)
    if code in _UNAVAILABLE_CODES:
        metadata.setdefault("service", service)
        name = code.name if code is not None else "UNAVAILABLE"
        return errors.Unavailable(f"{service} is unavailable ({name}): {message}",
                                  reason=reason, metadata=metadata)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return errors.InvalidArgument(message, violations=_violations(status), reason=reason,
                                      metadata=metadata)
    kind = _DOMAIN_ERRORS.get(code) if code is not None else None
    if kind is not None:
        return kind(message, reason=reason, metadata=metadata)
    metadata.setdefault("service", service)
    name = code.name if code is not None else "UNKNOWN"
    failure = errors.NubisError(f"{service} failed ({name}): {message}", reason=reason,
                                metadata=metadata)
    failure.code = name
    return failure


def _error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo:
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return error_details_pb2.ErrorInfo()


def _violations(status: status_pb2.Status | None) -> list[errors.FieldViolation]:
    found: list[errors.FieldViolation] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found += [errors.FieldViolation(v.field, v.description) for v in bad.field_violations]
    return found


def _code_and_message(exc: grpc.RpcError) -> tuple[str, str]:
    # grpc.aio.AioRpcError is no grpc.Call, yet both offer code() and details().
    if isinstance(exc, grpc.Call | grpc.aio.AioRpcError):
        code = exc.code()
        return (code.name if code is not None else "UNKNOWN"), (exc.details() or "")
    return "UNKNOWN", str(exc)


def describe_domain_error(exc: errors.NubisError) -> str:
    """A local (non-RPC) domain error in the same shape, with the fix when one is known."""
    line = exc.message
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        line += " [" + "; ".join(f"{v.field}: {v.description}" for v in exc.violations) + "]"
    line = f"{line} ({exc.reason})"
    fix = _local_fix(exc)
    return f"{line}; {fix}" if fix else line


# Local errors of the SDK's caller that a service out of reach makes (peers.caller's
# DEADLINE, peers.endpoints' NO_ENDPOINT): told with the same fix as an UNAVAILABLE call.
_OUT_OF_REACH = frozenset({"nubis.client.deadline_exceeded", "nubis.client.no_endpoint"})


def _local_fix(exc: errors.NubisError) -> str:
    """The fix of a local error: log in again, or start a lab; "" for the CLI's own."""
    if isinstance(exc, errors.Unauthenticated) or exc.reason in _OUT_OF_REACH:
        return fix_for(_code_of(exc), exc.message, exc.reason)
    return ""


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
