"""A callee's status read back as the domain error it was made from (status.py inverted)."""

from __future__ import annotations

import grpc
import pytest

from services.client import rpc_errors
from services.common import errors
from services.common.server import status

_ERRORS: list[errors.NubisError] = [
    errors.NotFound("port p-1 not found", metadata={"id": "p-1"}),
    errors.AlreadyExists("name taken", reason="nubis.identity.name_taken",
                         metadata={"name": "web"}),
    errors.Conflict("changed meanwhile", metadata={"revision": "7"}),
    errors.InvalidArgument("invalid port", violations=[
        errors.FieldViolation("port.mac", "not a MAC"),
        errors.FieldViolation("port.network_id", "required")], metadata={"kind": "port"}),
    errors.FailedPrecondition("project in use", reason="nubis.identity.project_in_use"),
    errors.ResourceExhausted("quota", reason="nubis.quota.exceeded",
                             metadata={"resource": "ports"}),
    errors.PermissionDenied("no", reason="nubis.policy.denied"),
    errors.Unauthenticated("expired", reason="nubis.auth.invalid_token"),
]


def _as_rpc_error(error: errors.NubisError) -> grpc.aio.AioRpcError:
    """What a client receives when a nubis server raises `error`."""
    served = status.from_error(error)
    return grpc.aio.AioRpcError(served.code, grpc.aio.Metadata(),
                                grpc.aio.Metadata(*served.trailing_metadata), served.details)


@pytest.mark.parametrize("error", _ERRORS, ids=lambda e: type(e).__name__)
def test_the_callee_error_comes_back_with_its_class_reason_and_details(
    error: errors.NubisError,
) -> None:
    back = rpc_errors.domain_error(_as_rpc_error(error), "network")
    assert type(back) is type(error)
    assert (back.message, back.reason, back.metadata) == (
        error.message, error.reason, error.metadata)
    if isinstance(error, errors.InvalidArgument):
        assert isinstance(back, errors.InvalidArgument)
        assert back.violations == error.violations
    assert status.code_of(back) == status.code_of(error)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_an_unreachable_callee_is_unavailable_naming_it(code: grpc.StatusCode) -> None:
    failed = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                  "failed to connect to all addresses")
    back = rpc_errors.domain_error(failed, "network")
    assert isinstance(back, errors.Unavailable)
    assert back.reason == errors.Unavailable.reason
    assert back.metadata == {"service": "network"}
    assert back.message.startswith("network is unavailable")


def test_a_callee_fault_stays_a_fault_of_the_caller() -> None:
    failed = _as_rpc_error(errors.NubisError("boom"))
    internal = status.internal("req-1")
    failed = grpc.aio.AioRpcError(internal.code, grpc.aio.Metadata(),
                                  grpc.aio.Metadata(*internal.trailing_metadata), internal.details)
    back = rpc_errors.domain_error(failed, "storage")
    assert type(back) is errors.NubisError
    assert status.code_of(back) == grpc.StatusCode.INTERNAL
    assert back.reason == status.REASON_INTERNAL and back.metadata["service"] == "storage"
