"""The service clients' declarations match the protos: every RPC declared, with its deadline."""

from __future__ import annotations

import uuid

import pytest
from google.protobuf import descriptor_pool, message
from nubis.scheduler.v1 import scheduler_pb2

from services.client.peers import rpc, stubs

# Importing the stubs registers the protos in the default pool.
_POOL = descriptor_pool.Default()


Declared = rpc.Rpc[message.Message, message.Message]


def _declared(client: type[rpc.ServiceClient]) -> dict[str, Declared]:
    return {name: value for name, value in vars(client).items() if isinstance(value, rpc.Rpc)}


@pytest.mark.parametrize("client", stubs.CLIENTS, ids=lambda c: c.NAME)
def test_every_rpc_of_the_service_is_declared_with_its_types(
    client: type[rpc.ServiceClient],
) -> None:
    service = _POOL.FindServiceByName(client.SERVICE)
    declared = _declared(client)
    assert sorted(declared) == sorted(m.name for m in service.methods)
    for method in service.methods:
        call = declared[method.name]
        assert not method.client_streaming and not method.server_streaming
        assert call.request.DESCRIPTOR.full_name == method.input_type.full_name
        assert call.response.DESCRIPTOR.full_name == method.output_type.full_name
        assert call.path == f"/{client.SERVICE}/{method.name}"
        assert call.service == client.NAME
        assert 0 < call.timeout <= 60, f"{method.name} needs a deadline"


def test_only_idempotent_calls_and_calls_with_a_request_id_are_retryable() -> None:
    scheduler = stubs.SchedulerClient
    assert scheduler.GetNode.retryable(scheduler_pb2.GetNodeRequest(name="n"))
    assert scheduler.SelectDestinations.retryable(scheduler_pb2.SelectDestinationsRequest())
    assert not scheduler.ReleaseAllocations.retryable(scheduler_pb2.ReleaseAllocationsRequest())
    assert not scheduler.CreateServerGroup.retryable(scheduler_pb2.CreateServerGroupRequest())
    with_id = scheduler_pb2.CreateServerGroupRequest(request_id=str(uuid.uuid4()))
    assert scheduler.CreateServerGroup.retryable(with_id)
    assert not stubs.IdentityClient.Authenticate.authenticated
