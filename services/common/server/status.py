"""The one mapping from domain exceptions (services.common.errors) to gRPC status.

Every status carries google.rpc details: ErrorInfo (stable reason, domain
"nubis", metadata) always, BadRequest field violations for InvalidArgument.
Clients read them with ``grpc_status.rpc_status.from_call``.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors

DOMAIN = "nubis"

# Looked up along the exception's MRO, so a subclass a service defines
# (e.g. a QuotaExceeded(ResourceExhausted)) maps like its base.
_CODES: Mapping[type, grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

# A status travels in response headers, which gRPC clients refuse beyond 16 KiB
# (the call then fails with a bare RESOURCE_EXHAUSTED that hides the error).
# Messages often quote the bad input, so every text is cut to a byte budget
# that keeps the whole status well under that limit whatever the input was.
MAX_MESSAGE_BYTES = 512
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 256
MAX_METADATA_BYTES = 128
MAX_ITEMS = 10
_CUT = "…"

# Reasons of the statuses the server produces itself (not from a domain error).
REASON_INTERNAL = "nubis.internal"
REASON_UNIMPLEMENTED = "nubis.unimplemented"


def code_of(exc: errors.NubisError) -> grpc.StatusCode:
    """The gRPC code of a domain error (a bare NubisError is a server fault)."""
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), marked if cut."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    kept = encoded[: limit - len(_CUT.encode())].decode(errors="ignore")
    return kept + _CUT


def _rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str],
    violations: list[errors.FieldViolation] | None = None,
) -> grpc.Status:
    status = status_pb2.Status(code=_google_code(code), message=bounded(message, MAX_MESSAGE_BYTES))
    kept_metadata = {
        bounded(key, MAX_METADATA_BYTES): bounded(value, MAX_METADATA_BYTES)
        for key, value in list(metadata.items())[:MAX_ITEMS]
    }
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=kept_metadata)
    status.details.append(_pack(info))
    if violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=bounded(v.field, MAX_FIELD_BYTES),
                    description=bounded(v.description, MAX_DESCRIPTION_BYTES),
                )
                for v in violations[:MAX_ITEMS]
            ]
        )
        status.details.append(_pack(bad_request))
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _google_code(code: grpc.StatusCode) -> int:
    # grpc.StatusCode values are (number, name) pairs; google.rpc.Code shares the numbers.
    number: int = code.value[0]
    return number


def from_error(exc: errors.NubisError) -> grpc.Status:
    """The status a client sees for a domain error."""
    violations = exc.violations if isinstance(exc, errors.InvalidArgument) else None
    return _rich_status(code_of(exc), exc.message, exc.reason, exc.metadata, violations)


def internal(request_id: str) -> grpc.Status:
    """The status of an unexpected failure: no exception text, only the request id to quote."""
    return _rich_status(
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id})",
        REASON_INTERNAL,
        {"request_id": request_id},
    )


def unimplemented(method: str) -> grpc.Status:
    """The status of a method this server declares but does not implement."""
    return _rich_status(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not implemented",
        REASON_UNIMPLEMENTED,
        {"method": method},
    )
