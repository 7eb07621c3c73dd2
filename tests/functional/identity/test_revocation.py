"""Revocations reach other processes through the store within seconds (watch-fed lists)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc

from services.client.channel import make_channel
from services.client.lab import daemons
from tests.functional.authz.world import PASSWORD, World

DEADLINE = 5.0


async def _rejected_within(stub: identity_pb2_grpc.IdentityServiceAsyncStub, token: str,
                           project_id: str) -> float:
    """Seconds until `stub` refuses `token` (fails the test after DEADLINE)."""
    started = time.monotonic()
    metadata = (("authorization", f"Bearer {token}"),)
    while time.monotonic() - started < DEADLINE:
        try:
            await stub.GetProject(identity_pb2.GetProjectRequest(id=project_id),
                                  metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    pytest.fail(f"token still accepted {DEADLINE}s after revocation")


async def _fresh_token(world: World, caller: str) -> str:
    return await world.login(world.names[caller], world.project_a, PASSWORD)


async def _accepted(stub: identity_pb2_grpc.IdentityServiceAsyncStub, token: str,
                    project_id: str) -> None:
    await stub.GetProject(identity_pb2.GetProjectRequest(id=project_id),
                          metadata=(("authorization", f"Bearer {token}"),))


async def test_revoked_token_rejected_elsewhere_within_5s(
    world: World, replica: identity_pb2_grpc.IdentityServiceAsyncStub
) -> None:
    token = await _fresh_token(world, "a_reader")
    await _accepted(replica, token, world.project_a)
    await world.stub.RevokeToken(identity_pb2.RevokeTokenRequest(token=token),
                                 metadata=(("authorization", f"Bearer {token}"),))
    elapsed = await _rejected_within(replica, token, world.project_a)
    assert elapsed < DEADLINE
    # Another token of the same user is untouched.
    await _accepted(replica, await _fresh_token(world, "a_reader"), world.project_a)


async def test_disabled_user_loses_every_token(
    world: World, replica: identity_pb2_grpc.IdentityServiceAsyncStub
) -> None:
    name = f"disable-me-{time.monotonic_ns()}"
    user_id = await world.make_user(name, world.project_a, "member")
    token = await world.login(name, world.project_a)
    await _accepted(replica, token, world.project_a)
    await world.stub.UpdateUser(identity_pb2.UpdateUserRequest(
        user=identity_pb2.User(meta=resource_pb2.ResourceMeta(id=user_id), enabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["enabled"])),
        metadata=world.metadata("cloud_admin"))
    assert await _rejected_within(replica, token, world.project_a) < DEADLINE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await world.login(name, world.project_a)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_disabled_project_loses_every_token(
    world: World, replica: identity_pb2_grpc.IdentityServiceAsyncStub
) -> None:
    project_id = await world.make_project(f"disable-{time.monotonic_ns()}")
    name = f"in-disabled-{time.monotonic_ns()}"
    await world.make_user(name, project_id, "admin")
    token = await world.login(name, project_id)
    await _accepted(replica, token, project_id)
    await world.stub.UpdateProject(identity_pb2.UpdateProjectRequest(
        project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(id=project_id),
                                     enabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["enabled"])),
        metadata=world.metadata("cloud_admin"))
    assert await _rejected_within(replica, token, project_id) < DEADLINE


@pytest.fixture
async def scheduler(world: World, tmp_path: Path
                    ) -> AsyncIterator[scheduler_pb2_grpc.SchedulerServiceAsyncStub]:
    """Another service, in its own process, verifying tokens locally from etcd."""
    port = daemons.free_port()
    env = {
        **os.environ,
        "NUBIS_ETCD__ENDPOINTS": json.dumps(world.settings.etcd.endpoints),
        "NUBIS_ETCD__PREFIX": world.settings.etcd.prefix,
        "NUBIS_SCHEDULER__PORT": str(port),
        "NUBIS_SCHEDULER__METRICS_PORT": "0",
        "NUBIS_SHUTDOWN_GRACE": "1",
    }
    process = daemons.spawn("scheduler", [sys.executable, "-m", "services.scheduler.main"],
                            tmp_path / "scheduler.log", env=env)
    channel = make_channel(f"127.0.0.1:{port}")
    try:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        await stub.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(),
                                    metadata=world.metadata("a_reader"), wait_for_ready=True,
                                    timeout=30)
        yield stub
    finally:
        await channel.close()
        process.stop()


async def _scheduler_refuses_within(stub: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
                                    token: str) -> float:
    """Seconds until the scheduler refuses `token` (fails the test after DEADLINE)."""
    metadata = (("authorization", f"Bearer {token}"),)
    started = time.monotonic()
    while True:
        try:
            await stub.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(),
                                        metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return time.monotonic() - started
        assert time.monotonic() - started < DEADLINE, "scheduler still accepts the token"
        await asyncio.sleep(0.05)


async def test_revoked_token_rejected_by_a_scheduler_process_within_5s(
    world: World, scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
) -> None:
    token = await _fresh_token(world, "a_reader")
    metadata = (("authorization", f"Bearer {token}"),)
    await scheduler.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(), metadata=metadata)
    await world.stub.RevokeToken(identity_pb2.RevokeTokenRequest(token=token), metadata=metadata)
    assert await _scheduler_refuses_within(scheduler, token) < DEADLINE


async def test_role_revoked_in_one_project_keeps_the_users_other_tokens(
    world: World, replica: identity_pb2_grpc.IdentityServiceAsyncStub,
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub,
) -> None:
    """Project A's admin takes a role away in A: only the user's A-scoped tokens go (Keystone)."""
    name = f"two-projects-{time.monotonic_ns()}"
    user_id = await world.make_user(name, world.project_a, "member")
    await world.stub.GrantRole(identity_pb2.GrantRoleRequest(
        user_id=user_id, project_id=world.project_b, role="member"),
        metadata=world.metadata("cloud_admin"))
    in_a, in_b = await world.login(name, world.project_a), await world.login(name, world.project_b)
    await world.stub.RevokeRole(identity_pb2.RevokeRoleRequest(
        user_id=user_id, project_id=world.project_a, role="member"),
        metadata=world.metadata("a_admin"))
    # Once the A-scoped token is refused everywhere, the revocation has arrived there...
    assert await _rejected_within(replica, in_a, world.project_a) < DEADLINE
    assert await _rejected_within(world.stub, in_a, world.project_a) < DEADLINE
    assert await _scheduler_refuses_within(scheduler, in_a) < DEADLINE
    # ...and the B-scoped token still works, on identity and on the scheduler.
    for stub in (replica, world.stub):
        await _accepted(stub, in_b, world.project_b)
    await scheduler.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(),
                                     metadata=(("authorization", f"Bearer {in_b}"),))
    # A cloud-wide role taken away still reaches every token of the user.
    await world.stub.GrantRole(identity_pb2.GrantRoleRequest(user_id=user_id, role="service"),
                               metadata=world.metadata("cloud_admin"))
    fresh_b = await world.login(name, world.project_b)
    await world.stub.RevokeRole(identity_pb2.RevokeRoleRequest(user_id=user_id, role="service"),
                                metadata=world.metadata("cloud_admin"))
    assert await _rejected_within(replica, fresh_b, world.project_b) < DEADLINE
