"""Service-to-service calls over real gRPC and etcd: catalog discovery, replicas, restarts, errors.

The client is given identity's address and the service credential, nothing
else: the scheduler is found in identity's catalog. Real identity and
scheduler servers (their own mains) answer; nothing of nubis is mocked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import MutableMapping
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf import message
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client import rpc_errors
from services.client.channel import make_channel
from services.client.peers import endpoints
from services.common import errors
from services.common.server import status
from services.common.settings import ServiceEndpoint
from services.scheduler import allocations
from tests.functional.authz.world import Service
from tests.functional.scheduler_harness import Replica, start_replica
from tests.functional.service_client_harness import (
    NODES,
    Cloud,
    CloudFactory,
    code_of,
    make_cloud,
    metric,
    spec,
)

__all__ = ["make_cloud"]

GET = scheduler_pb2.GetNodeRequest(name=NODES[0])


async def test_the_scheduler_is_found_through_the_catalog_only(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud()
    # A scheduler that serves but never registered: nothing leads the client to it.
    unregistered: Replica = await start_replica(cloud.settings)
    try:
        clients = cloud.clients(attempts=2)
        with pytest.raises(errors.Unavailable) as missing:
            await clients.scheduler.GetNode(GET)
        assert missing.value.reason == endpoints.NO_ENDPOINT
        assert missing.value.metadata["service"] == "scheduler"
    finally:
        await unregistered.stop()
    registered = await cloud.start_scheduler()
    node = await clients.scheduler.GetNode(GET)
    assert node.name == NODES[0]
    assert metric(registered, "GetNode", "OK") == 1
    assert clients.caller.settings.identity_address == cloud.identity.running.address
    assert registered.running.address in clients.caller.directory.known()


async def test_calls_spread_over_replicas_and_fail_over_a_dead_one(
    make_cloud: CloudFactory,
) -> None:
    cloud = await make_cloud()
    first, second = await cloud.start_scheduler(), await cloud.start_scheduler()
    clients = cloud.clients()
    for _ in range(10):
        await clients.scheduler.GetNode(GET)
    served = [metric(first, "GetNode", "OK"), metric(second, "GetNode", "OK")]
    assert sum(served) == 10 and min(served) >= 3, served
    # The first replica's server stops but its catalog entry lives on (its
    # lease is still kept): the client must step over the dead address.
    await first.running.stop(0)
    for _ in range(10):
        await clients.scheduler.GetNode(GET)
    assert metric(second, "GetNode", "OK") == served[1] + 10


@pytest.mark.parametrize("same_port", [True, False], ids=["same-port", "new-port"])
async def test_an_idempotent_call_survives_the_callee_restart(
    make_cloud: CloudFactory, same_port: bool,
) -> None:
    cloud = await make_cloud()
    before = await cloud.start_scheduler()
    clients = cloud.clients(attempts=12, max_backoff=1.0)
    await clients.scheduler.GetNode(GET)
    await cloud.stop(before)
    call = asyncio.create_task(clients.scheduler.GetNode(GET, deadline=30))
    await asyncio.sleep(1.0)
    assert not call.done(), "the call gave up while the scheduler was down"
    port = before.running.port if same_port else 0
    after = await cloud.start_scheduler(ServiceEndpoint(host="127.0.0.1", port=port))
    assert (after.running.port == before.running.port) is same_port
    node = await call
    assert node.name == NODES[0]
    assert metric(after, "GetNode", "OK") == 1


async def test_only_calls_safe_to_repeat_are_retried(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud()
    dead = await cloud.start_scheduler()
    await dead.running.stop(0)  # its catalog entry stays: every attempt finds it dead
    clients = cloud.clients(attempts=3, initial_backoff=0.01)
    release = scheduler_pb2.ReleaseAllocationsRequest(consumer_id=str(uuid.uuid4()))
    group = scheduler_pb2.CreateServerGroupRequest(request_id=str(uuid.uuid4()))
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(errors.Unavailable) as read:
            await clients.scheduler.GetNode(GET)
        retried_read = _retries(logs)
        with pytest.raises(errors.Unavailable):
            await clients.scheduler.ReleaseAllocations(release)
        retried_release = _retries(logs) - retried_read
        with pytest.raises(errors.Unavailable):
            await clients.scheduler.CreateServerGroup(group)
        retried_create = _retries(logs) - retried_read - retried_release
    assert read.value.metadata["service"] == "scheduler"
    assert "scheduler is unavailable" in read.value.message
    # attempts=3: two retries of the read and of the create that carries a
    # request_id; none of a release, which might have run.
    assert (retried_read, retried_release, retried_create) == (2, 0, 2)


def _retries(logs: list[MutableMapping[str, Any]]) -> int:
    return sum(1 for entry in logs if entry.get("event") == "retrying call")


async def test_callee_errors_come_back_as_the_same_domain_errors(
    make_cloud: CloudFactory,
) -> None:
    cloud = await make_cloud()
    scheduler = await cloud.start_scheduler()
    clients = cloud.clients()
    with pytest.raises(errors.NotFound) as missing:
        await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name="no-such-node"))
    assert missing.value.reason == "nubis.not_found"
    assert missing.value.metadata == {"node": "no-such-node"}
    assert "no-such-node" in missing.value.message
    raw = await _raw_failure(cloud, scheduler, "GetNode",
                             scheduler_pb2.GetNodeRequest(name="no-such-node"))
    _same_status(missing.value, raw)

    with pytest.raises(errors.InvalidArgument) as invalid:
        await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name="Not A Name!"))
    assert [v.field for v in invalid.value.violations] == ["name"]
    _same_status(invalid.value, await _raw_failure(
        cloud, scheduler, "GetNode", scheduler_pb2.GetNodeRequest(name="Not A Name!")))

    consumer = str(uuid.uuid4())
    await clients.scheduler.SelectDestinations(spec(consumer))
    await clients.scheduler.MoveAllocations(
        scheduler_pb2.MoveAllocationsRequest(consumer_id=consumer))
    with pytest.raises(errors.FailedPrecondition) as moving:
        await clients.scheduler.MoveAllocations(
            scheduler_pb2.MoveAllocationsRequest(consumer_id=consumer))
    assert moving.value.reason == allocations.MOVE_IN_PROGRESS
    assert moving.value.metadata == {"consumer_id": consumer}
    _same_status(moving.value, await _raw_failure(
        cloud, scheduler, "MoveAllocations",
        scheduler_pb2.MoveAllocationsRequest(consumer_id=consumer)))

    # Identity's errors come back the same way.
    with pytest.raises(errors.NotFound) as no_user:
        await clients.identity.GetUser(identity_pb2.GetUserRequest(id=str(uuid.uuid4())))
    assert no_user.value.reason == "nubis.not_found"


async def _raw_failure(cloud: Cloud, scheduler: Service, method: str,
                       request: message.Message) -> grpc.aio.AioRpcError:
    """The callee's own status for `request`, through a plain stub with the service's token."""
    login = await cloud.clients().caller.token.current()
    channel = make_channel(scheduler.running.address, token=login)
    try:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await getattr(stub, method)(request)
        return failed.value
    finally:
        await channel.close()


def _same_status(domain: errors.NubisError, raw: grpc.aio.AioRpcError) -> None:
    """The domain error, served again by the caller, gives the callee's code, reason, details."""
    again = status.from_error(domain)
    assert again.code == code_of(raw)
    assert again.details == raw.details()
    assert rpc_errors.error_reason(raw) == domain.reason
    assert rpc_errors.describe_rpc_error(raw).endswith(f"({domain.reason})")
