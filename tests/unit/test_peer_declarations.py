"""The service clients' declarations match the protos: every RPC declared, with its deadline."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import descriptor_pool, message
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import storage_service_pb2

from services.client.peers import rpc, stubs

# Importing the stubs registers the protos in the default pool (the services
# whose messages live apart from them by importing their service module).
_POOL = descriptor_pool.Default()
_REGISTERED = (storage_service_pb2,)


Declared = rpc.Rpc[message.Message, message.Message]


def _declared(client: type[rpc.ServiceClient]) -> dict[str, Declared]:
    return {name: value for name, value in vars(client).items() if isinstance(value, rpc.Rpc)}


@pytest.mark.parametrize("client", stubs.CLIENTS, ids=lambda c: c.NAME)
def test_every_rpc_of_the_service_is_declared_with_its_types(
    client: type[rpc.ServiceClient],
) -> None:
    service = _POOL.FindServiceByName(client.SERVICE)
    declared = _declared(client)
    # No service sends a client stream (an image upload comes from users).
    called = [m for m in service.methods if not m.client_streaming]
    assert sorted(declared) == sorted(m.name for m in called)
    for method in called:
        call = declared[method.name]
        assert isinstance(call, rpc.ServerStream) == method.server_streaming, method.name
        assert call.request.DESCRIPTOR.full_name == method.input_type.full_name
        assert call.response.DESCRIPTOR.full_name == method.output_type.full_name
        assert call.path == f"/{client.SERVICE}/{method.name}"
        assert call.service == client.NAME
        # A stream's deadline covers all of it (a whole image, a watch).
        limit = 3600 if method.server_streaming else 60
        assert 0 < call.timeout <= limit, f"{method.name} needs a deadline"


def test_only_idempotent_calls_and_calls_with_a_request_id_are_retryable() -> None:
    scheduler = stubs.SchedulerClient
    assert scheduler.GetNode.retryable(scheduler_pb2.GetNodeRequest(name="n"))
    assert scheduler.SelectDestinations.retryable(scheduler_pb2.SelectDestinationsRequest())
    assert not scheduler.ReleaseAllocations.retryable(scheduler_pb2.ReleaseAllocationsRequest())
    assert not scheduler.CreateServerGroup.retryable(scheduler_pb2.CreateServerGroupRequest())
    with_id = scheduler_pb2.CreateServerGroupRequest(request_id=str(uuid.uuid4()))
    assert scheduler.CreateServerGroup.retryable(with_id)
    assert not stubs.IdentityClient.Authenticate.authenticated
