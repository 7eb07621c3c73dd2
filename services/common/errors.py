"""Domain exceptions: what every layer below a servicer raises.

The domain never knows about gRPC. One module (services.common.server.status)
maps these to gRPC status codes with google.rpc details. Reason strings are
part of the API: once released they never change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, as google.rpc.BadRequest reports it."""

    field: str
    description: str


class NubisError(Exception):
    """Base of every domain error.

    `reason` is a stable, dotted identifier (``nubis.quota.exceeded``) that
    clients can match on; `metadata` carries small string facts for ErrorInfo.
    """

    reason: str = "nubis.error"
    code: str = "INTERNAL"
    """The google.rpc status name a caller sees it as (NOT_FOUND, ...); services map
    it in services.common.server.status, clients read it back (services.client.rpc_errors)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})


class NotFound(NubisError):
    """The resource does not exist, or the caller may not know it exists."""

    reason = "nubis.not_found"
    code = "NOT_FOUND"


class AlreadyExists(NubisError):
    """A create lost to an existing resource with the same key or name."""

    reason = "nubis.already_exists"
    code = "ALREADY_EXISTS"


class Conflict(NubisError):
    """An optimistic-concurrency compare failed (and retries ran out)."""

    reason = "nubis.conflict"
    code = "ABORTED"


class InvalidArgument(NubisError):
    """The request is malformed; `violations` names each bad field."""

    reason = "nubis.invalid_argument"
    code = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations: list[FieldViolation] = list(violations)


class FailedPrecondition(NubisError):
    """The request is well formed but the system is not in a state to run it."""

    reason = "nubis.failed_precondition"
    code = "FAILED_PRECONDITION"


class ResourceExhausted(NubisError):
    """Quota or capacity would be exceeded."""

    reason = "nubis.resource_exhausted"
    code = "RESOURCE_EXHAUSTED"


class PermissionDenied(NubisError):
    """The caller is authenticated but its roles do not allow the call."""

    reason = "nubis.permission_denied"
    code = "PERMISSION_DENIED"


class Unauthenticated(NubisError):
    """No token, or a token that is expired, forged, tampered or revoked."""

    reason = "nubis.unauthenticated"
    code = "UNAUTHENTICATED"


class Unavailable(NubisError):
    """A dependency (etcd, another service, an agent) cannot be reached now; retry."""

    reason = "nubis.unavailable"
    code = "UNAVAILABLE"


@dataclass
class ViolationCollector:
    """Gathers field violations so a request reports all its faults at once."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.violations.append(FieldViolation(field_path, description))

    def check(self, message: str = "invalid request") -> None:
        """Raise InvalidArgument if anything was collected."""
        if self.violations:
            raise InvalidArgument(message, violations=self.violations)
