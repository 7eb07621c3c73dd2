"""The login throttle holds under concurrency and across replicas (its count lives in etcd).

Fifty wrong passwords sent at once, half to each of two identity replicas, get
exactly `max_failures` password checks; the rest, and then the right password,
are refused as throttled. Unknown names are throttled alike and cost about the
time of a wrong password, and a successful login resets the count.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

import grpc
import pytest
from nubis.identity.v1 import identity_pb2

from services.client import peers, rpc_errors
from services.common import errors
from tests.functional.authz.world import PASSWORD, World

if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    from nubis.identity.v1.identity_pb2_grpc import IdentityServiceAsyncStub

PARALLEL = 50


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _outcome(call: asyncio.Future[identity_pb2.AuthenticateResponse] | object
                   ) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), rpc_errors.error_reason(exc)
    return grpc.StatusCode.OK, ""


async def _storm(stubs: list[IdentityServiceAsyncStub], name: str, project: str,
                 password: str) -> Counter[tuple[grpc.StatusCode, str]]:
    request = identity_pb2.AuthenticateRequest(username=name, password=password, project=project)
    outcomes = await asyncio.gather(*(_outcome(stubs[i % len(stubs)].Authenticate(request))
                                      for i in range(PARALLEL)))
    return Counter(outcomes)


async def test_parallel_wrong_passwords_on_two_replicas_lock_the_name(
    world: World, replica: IdentityServiceAsyncStub
) -> None:
    name = _unique("stormed")
    await world.make_user(name, world.project_a, "reader")
    limit = world.settings.auth.max_failures
    counts = await _storm([world.stub, replica], name, world.project_a, "wrong password")
    assert counts == {
        (grpc.StatusCode.UNAUTHENTICATED, "nubis.auth.invalid_credentials"): limit,
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "nubis.auth.throttled"): PARALLEL - limit,
    }
    right = identity_pb2.AuthenticateRequest(username=name, password=PASSWORD,
                                             project=world.project_a)
    for stub in (world.stub, replica):
        assert await _outcome(stub.Authenticate(right)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "nubis.auth.throttled")


async def test_unknown_names_are_throttled_alike(
    world: World, replica: IdentityServiceAsyncStub
) -> None:
    limit = world.settings.auth.max_failures
    counts = await _storm([world.stub, replica], _unique("nobody"), world.project_a, "guess")
    assert counts == {
        (grpc.StatusCode.UNAUTHENTICATED, "nubis.auth.invalid_credentials"): limit,
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "nubis.auth.throttled"): PARALLEL - limit,
    }


async def test_a_successful_login_resets_the_count(
    world: World, replica: IdentityServiceAsyncStub
) -> None:
    name = _unique("forgetful")
    await world.make_user(name, world.project_a, "reader")
    limit = world.settings.auth.max_failures
    wrong = identity_pb2.AuthenticateRequest(username=name, password="wrong password",
                                             project=world.project_a)
    stubs = [world.stub, replica]
    for round_ in range(2):
        for i in range(limit - 1):
            code, _ = await _outcome(stubs[i % 2].Authenticate(wrong))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (round_, i)
        # The right password on the other replica clears what both counted.
        await world.login(name, world.project_a) if round_ else await replica.Authenticate(
            identity_pb2.AuthenticateRequest(username=name, password=PASSWORD,
                                             project=world.project_a))


async def _seconds(stub: IdentityServiceAsyncStub, name: str, project: str) -> float:
    started = time.perf_counter()
    code, _ = await _outcome(stub.Authenticate(identity_pb2.AuthenticateRequest(
        username=name, password="not the password", project=project)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    return time.perf_counter() - started


async def test_an_unknown_name_costs_about_what_a_wrong_password_does(world: World) -> None:
    known = [_unique("timed") for _ in range(4)]
    for name in known:
        await world.make_user(name, world.project_a, "reader")
    wrong, unknown = [], []
    for attempt in range(12):  # interleaved, fewer failures per name than the limit
        wrong.append(await _seconds(world.stub, known[attempt % 4], world.project_a))
        unknown.append(await _seconds(world.stub, _unique("ghost"), world.project_a))
    ratio = statistics.median(unknown) / statistics.median(wrong)
    # Both run one argon2 check (a decoy for the unknown name); generous for a busy host.
    assert 0.4 < ratio < 2.5, (ratio, wrong, unknown)


async def test_services_logging_in_at_once_as_one_user_are_all_let_in(world: World) -> None:
    """More logins of one (service) user at once than its failure limit: identity throttles
    those counted while the first is checked, and the services ask again until it lets them
    in. A wrong password stays refused."""
    name = _unique("service")
    await world.make_user(name, world.project_a, "reader")
    limit = world.settings.auth.max_failures
    base = peers.ClientSettings(world.address, peers.ServiceCredential(
        name, PASSWORD, world.project_a))
    clients = [peers.ServiceClients(base) for _ in range(limit * 4)]
    request = identity_pb2.AuthenticateRequest(username=name, password=PASSWORD,
                                               project=world.project_a)
    try:
        # Sent bare, at once, some are throttled: the refusal the services must get past. A
        # storm identity happens to serve one by one throttles none; up to three are sent.
        throttled = (grpc.StatusCode.RESOURCE_EXHAUSTED, "nubis.auth.throttled")
        for _ in range(3):
            bare = await _storm([world.stub], name, world.project_a, PASSWORD)
            if bare[throttled] > 0:
                break
        assert bare[throttled] > 0, bare
        assert await _outcome(world.stub.Authenticate(request)) == (grpc.StatusCode.OK, "")

        tokens = await asyncio.gather(*(c.caller.token.current() for c in clients))
        assert len(set(tokens)) == len(clients)
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    wrong = peers.ServiceClients(dataclasses.replace(
        base, credential=peers.ServiceCredential(name, "wrong password", world.project_a)))
    try:
        began = time.monotonic()
        with pytest.raises(errors.NubisError) as refused:
            await asyncio.gather(*(wrong.caller.token.current() for _ in range(limit + 1)))
        assert refused.value.reason in ("nubis.auth.invalid_credentials", "nubis.auth.throttled")
        assert time.monotonic() - began < 30
    finally:
        await wrong.close()
