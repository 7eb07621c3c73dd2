"""The service token over real identity and scheduler servers: renewed before it expires,
and issued again once after a callee refused it (a revocation)."""

from __future__ import annotations

import asyncio
import time

import grpc
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.client.peers import ServiceClients, ServiceCredential
from services.common import errors
from tests.functional import scheduler_harness
from tests.functional.service_client_harness import (
    NODES,
    Cloud,
    CloudFactory,
    make_cloud,
    metric,
)

__all__ = ["make_cloud"]

GET = scheduler_pb2.GetNodeRequest(name=NODES[0])
TOKEN_TTL = 3  # seconds: tokens of this identity expire within the test


async def test_the_token_is_renewed_before_it_expires(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud(token_ttl=TOKEN_TTL)
    scheduler = await cloud.start_scheduler()
    clients = cloud.clients(renew_fraction=0.5)
    calls = 0
    began = time.monotonic()
    # Three lifetimes of calls: without renewal some would carry an expired token.
    while time.monotonic() - began < 3 * TOKEN_TTL:
        await clients.scheduler.GetNode(GET)
        calls += 1
        await asyncio.sleep(0.1)
    assert clients.caller.token.logins >= 3
    assert metric(scheduler, "GetNode", "UNAUTHENTICATED") == 0
    assert metric(scheduler, "GetNode", "OK") == calls


async def test_a_revoked_token_is_replaced_by_one_new_login(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud()
    scheduler = await cloud.start_scheduler()
    clients = cloud.clients()
    await clients.scheduler.GetNode(GET)
    revoked = await clients.caller.token.current()
    await clients.identity.RevokeToken(identity_pb2.RevokeTokenRequest(token=revoked))
    await _until_refused(scheduler.running.address, revoked)
    refusals = metric(scheduler, "GetNode", "UNAUTHENTICATED")
    logins = clients.caller.token.logins

    node = await clients.scheduler.GetNode(GET)

    assert node.name == NODES[0]
    assert clients.caller.token.logins == logins + 1
    assert metric(scheduler, "GetNode", "UNAUTHENTICATED") == refusals + 1
    assert await clients.caller.token.current() != revoked


async def test_a_wrong_service_password_is_unauthenticated(make_cloud: CloudFactory) -> None:
    cloud = await make_cloud()
    await cloud.start_scheduler()
    wrong = _wrong_password(cloud)
    clients = cloud.clients(credential=wrong)
    exc = await _refused(clients)
    assert "not-the-password" not in repr(wrong) + exc.message


def _wrong_password(cloud: Cloud) -> ServiceCredential:
    """The cloud's service credential with another password."""
    settings = cloud.client_settings()
    assert settings.credential is not None
    return type(settings.credential)(settings.credential.user, "not-the-password",
                                     settings.credential.project)


async def _refused(clients: ServiceClients) -> errors.Unauthenticated:
    """The refusal of a call with a wrong service password."""
    try:
        await clients.scheduler.GetNode(GET)
    except errors.Unauthenticated as exc:
        assert exc.reason == "nubis.auth.invalid_credentials"
        return exc
    raise AssertionError("a wrong password was accepted")


async def _until_refused(address: str, token: str) -> None:
    """Wait until the scheduler's verifier has heard of the revocation."""
    channel = make_channel(address, token=token, policy=CallPolicy(max_attempts=1))
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def refused() -> bool:
        try:
            await stub.GetNode(GET)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    try:
        await scheduler_harness.wait_for(refused)
    finally:
        await channel.close()


async def test_warming_logs_in_and_finds_a_peer_that_starts_later(
        make_cloud: CloudFactory) -> None:
    """What a service does at start: its login and its peer's replica are made before its
    first call, also when the peer registers only after the warming began."""
    cloud = await make_cloud()
    clients = cloud.clients()
    warming = asyncio.create_task(clients.warm("scheduler", within=20))
    await asyncio.sleep(0.5)
    assert not warming.done()  # no scheduler registered yet: asked again
    scheduler = await cloud.start_scheduler()
    await asyncio.wait_for(warming, 20)
    assert clients.caller.token.logins == 1
    assert scheduler.running.address in clients.caller.directory.known()
    await clients.scheduler.GetNode(GET)
    assert clients.caller.token.logins == 1  # the first call logged in no more


async def test_warming_never_fails_and_leaves_what_it_could_not_do_to_the_calls(
        make_cloud: CloudFactory) -> None:
    cloud = await make_cloud()
    await cloud.start_scheduler()
    refused = cloud.clients(credential=_wrong_password(cloud))
    began = time.monotonic()
    await refused.warm("scheduler", within=20)  # a refused login: no retries, no error
    assert time.monotonic() - began < 5
    await _refused(refused)
    clients = cloud.clients()
    began = time.monotonic()
    await clients.warm("no-such-service", within=1.5)  # never registered: given up on time
    assert 1.0 <= time.monotonic() - began < 5
    assert clients.caller.token.logins == 1
