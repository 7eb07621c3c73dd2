"""IdentityService behaviour over real gRPC: bad input, uniqueness, throttling, quotas, keys."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2, message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import make_channel
from services.common import quota
from services.common.store import Store
from services.identity import bootstrap, main, token
from tests.conftest import EtcdEndpoint
from tests.functional.authz.world import (
    ADMIN_PASSWORD,
    PASSWORD,
    World,
    service_settings,
    start_service,
)

P = identity_pb2


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _violations(exc: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    fields: set[str] = set()
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return fields


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_bad_login_requests(world: World) -> None:
    stub = world.stub
    assert await _code(stub.Authenticate(P.AuthenticateRequest(password="x"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    nobody = stub.Authenticate(P.AuthenticateRequest(username=_unique("nobody"), password="x"))
    assert await _code(nobody) == grpc.StatusCode.UNAUTHENTICATED
    elsewhere = stub.Authenticate(P.AuthenticateRequest(
        username=world.names["b_admin"], password=PASSWORD, project=world.project_a))
    assert await _code(elsewhere) == grpc.StatusCode.PERMISSION_DENIED


async def test_repeated_failures_are_throttled(world: World) -> None:
    name = _unique("throttled")
    await world.make_user(name, world.project_a, "reader")
    wrong = P.AuthenticateRequest(username=name, password="wrong password", project=world.project_a)
    for _ in range(world.settings.auth.max_failures):
        assert await _code(world.stub.Authenticate(wrong)) == grpc.StatusCode.UNAUTHENTICATED
    right = P.AuthenticateRequest(username=name, password=PASSWORD, project=world.project_a)
    assert await _code(world.stub.Authenticate(right)) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_token_carries_user_project_roles(world: World) -> None:
    reply = await world.stub.Authenticate(P.AuthenticateRequest(
        username=world.names["a_member"], password=PASSWORD, project=world.project_a))
    claims = jwt.decode(reply.token, options={"verify_signature": False})
    assert claims["sub"] == world.users["a_member"]
    assert claims["project"] == world.project_a
    assert claims["roles"] == ["member"]
    assert claims["jti"] == reply.token_id
    assert claims["exp"] - claims["iat"] == pytest.approx(world.settings.auth.token_ttl, abs=1)


async def test_user_validation_and_uniqueness(world: World) -> None:
    admin = world.metadata("cloud_admin")
    name = _unique("unique")
    request = P.CreateUserRequest(user=P.User(meta=resource_pb2.ResourceMeta(name=name)),
                                  password=PASSWORD)
    await world.stub.CreateUser(request, metadata=admin)
    assert await _code(world.stub.CreateUser(request, metadata=admin)) == \
        grpc.StatusCode.ALREADY_EXISTS
    bad = P.CreateUserRequest(user=P.User(meta=resource_pb2.ResourceMeta(name="../x")),
                              password="short")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.CreateUser(bad, metadata=admin)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value) == {"user.meta.name", "password"}


@pytest.mark.parametrize(
    ("method", "request_factory", "code"),
    [
        ("GetProject", lambda w: P.GetProjectRequest(id="not-a-uuid"), "INVALID_ARGUMENT"),
        ("GetProject", lambda w: P.GetProjectRequest(id=str(uuid.uuid4())), "NOT_FOUND"),
        ("UpdateProject", lambda w: P.UpdateProjectRequest(
            project=P.Project(meta=resource_pb2.ResourceMeta(id=w.project_a))),
         "INVALID_ARGUMENT"),
        ("UpdateProject", lambda w: P.UpdateProjectRequest(
            project=P.Project(meta=resource_pb2.ResourceMeta(id=w.project_a)),
            update_mask=field_mask_pb2.FieldMask(paths=["meta.id"])), "INVALID_ARGUMENT"),
        ("GrantRole", lambda w: P.GrantRoleRequest(
            user_id=w.users["grantee"], project_id=w.project_a, role="owner"),
         "INVALID_ARGUMENT"),
        ("GrantRole", lambda w: P.GrantRoleRequest(
            user_id=w.users["grantee"], project_id=w.project_a, role="cloud-admin"),
         "INVALID_ARGUMENT"),
        ("GrantRole", lambda w: P.GrantRoleRequest(
            user_id=str(uuid.uuid4()), project_id=w.project_a, role="reader"), "NOT_FOUND"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {"gpus": 1}, ["limits.gpus"]),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {"ports": -5}, ["limits.ports"]),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {"gpus": 1}, ["limits"]),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {"ports": 1}, []),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {}, ["project_id"]),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update("", {"ports": 1}, ["limits.ports"]),
         "INVALID_ARGUMENT"),
        ("UpdateQuota", lambda w: _quota_update(w.project_a, {"ports": 1}, ["limits.ports"],
                                                revision=1), "ABORTED"),
        ("ListProjects", lambda w: P.ListProjectsRequest(filter="colour=red"), "INVALID_ARGUMENT"),
        ("ListProjects", lambda w: P.ListProjectsRequest(filter="state=ACTIVE"),
         "INVALID_ARGUMENT"),
        ("ListUsers", lambda w: P.ListUsersRequest(filter="name"), "INVALID_ARGUMENT"),
        ("ListUsers", lambda w: P.ListUsersRequest(page_token="bogus", all_projects=True),
         "INVALID_ARGUMENT"),
        ("ListUsers", lambda w: P.ListUsersRequest(page_token="bogus"), "INVALID_ARGUMENT"),
        ("ListRoleAssignments", lambda w: P.ListRoleAssignmentsRequest(filter="role=owner"),
         "INVALID_ARGUMENT"),
        ("ListRoleAssignments", lambda w: P.ListRoleAssignmentsRequest(user_id="x"),
         "INVALID_ARGUMENT"),
        ("CreateProject", lambda w: P.CreateProjectRequest(
            project=P.Project(meta=resource_pb2.ResourceMeta(name=_unique("p"))),
            request_id="no spaces allowed"), "INVALID_ARGUMENT"),
        ("UpdateUser", lambda w: P.UpdateUserRequest(
            user=P.User(meta=resource_pb2.ResourceMeta(id=w.users["grantee"], name="x")),
            update_mask=field_mask_pb2.FieldMask(paths=["meta.name"])), "INVALID_ARGUMENT"),
        ("UpdateUser", lambda w: P.UpdateUserRequest(
            user=P.User(meta=resource_pb2.ResourceMeta(id=w.users["grantee"])),
            update_mask=field_mask_pb2.FieldMask(paths=["state"])), "INVALID_ARGUMENT"),
        ("ListProjects", lambda w: P.ListProjectsRequest(page_size=-1, all_projects=True),
         "INVALID_ARGUMENT"),
        ("ListEndpoints", lambda w: P.ListEndpointsRequest(name="../keys"), "INVALID_ARGUMENT"),
        ("RevokeToken", lambda w: P.RevokeTokenRequest(), "INVALID_ARGUMENT"),
        ("RevokeToken", lambda w: P.RevokeTokenRequest(token="garbage"), "INVALID_ARGUMENT"),
    ],
)
async def test_bad_input_gets_a_clear_code(world: World, method: str,
                                           request_factory: object, code: str) -> None:
    build = request_factory  # a lambda taking the world
    request: message.Message = build(world)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.call("nubis.identity.v1.IdentityService", method, request, "cloud_admin")
    assert caught.value.code().name == code, caught.value.details()


def _quota_update(project_id: str, limits: dict[str, int], paths: list[str],
                  revision: int = 0) -> P.UpdateQuotaRequest:
    return P.UpdateQuotaRequest(
        quota=P.Quota(project_id=project_id, limits=limits, revision=revision),
        update_mask=field_mask_pb2.FieldMask(paths=paths))


async def test_quota_update_and_usage(world: World) -> None:
    admin = world.metadata("cloud_admin")
    defaults = (await world.stub.GetDefaultQuota(P.GetDefaultQuotaRequest(),
                                                 metadata=admin)).limits
    # Other services' rows in the shared world may have set the project's limits already.
    before = (await world.stub.GetQuota(P.GetQuotaRequest(project_id=world.project_b),
                                        metadata=admin)).limits
    updated = await world.stub.UpdateQuota(_quota_update(
        world.project_b, {"instances": 3, "vcpus": -1, "ports": 99},
        ["limits.instances", "limits.vcpus"]), metadata=admin)
    assert updated.limits["instances"] == 3 and updated.limits["vcpus"] == -1
    assert updated.limits["ports"] == before["ports"] != 99, "a limit not in the mask is ignored"
    assert set(updated.limits) == set(quota.RESOURCES)
    # Stale revision: ABORTED and nothing changes; the current one succeeds.
    stale = world.stub.UpdateQuota(_quota_update(
        world.project_b, {"instances": 9}, ["limits.instances"], revision=updated.revision - 1),
        metadata=admin)
    assert await _code(stale) == grpc.StatusCode.ABORTED
    reset = await world.stub.UpdateQuota(_quota_update(
        world.project_b, {}, ["limits.instances"], revision=updated.revision), metadata=admin)
    assert reset.limits["instances"] == defaults["instances"]
    assert reset.limits["vcpus"] == -1
    replaced = await world.stub.UpdateQuota(_quota_update(
        world.project_b, {"ports": 5}, ["limits"]), metadata=admin)
    assert replaced.limits["vcpus"] == defaults["vcpus"] and replaced.limits["ports"] == 5
    usage = await world.stub.GetUsage(P.GetUsageRequest(), metadata=world.metadata("b_admin"))
    assert usage.project_id == world.project_b
    assert dict(usage.in_use) == dict.fromkeys(quota.RESOURCES, 0)


async def test_project_with_resources_cannot_be_deleted(world: World) -> None:
    project_id = await world.make_project(_unique("busy"))
    await world.store.create(quota.usage_key(project_id, "network"),
                             P.Usage(project_id=project_id, in_use={"ports": 1}))
    call = world.stub.DeleteProject(P.DeleteProjectRequest(id=project_id),
                                    metadata=world.metadata("cloud_admin"))
    assert await _code(call) == grpc.StatusCode.FAILED_PRECONDITION


async def test_catalog_lists_identity_at_its_bound_port(world: World) -> None:
    """Identity is configured with port 0; its catalog entry carries the port it bound."""
    assert world.settings.identity.port == 0
    reply = await world.stub.ListEndpoints(P.ListEndpointsRequest(name="identity"),
                                           metadata=world.metadata("a_reader"))
    assert [e.service for e in reply.endpoints][:1] == ["nubis.identity.v1.IdentityService"]
    addresses = [e.address for e in reply.endpoints]
    assert world.address in addresses
    assert not [a for a in addresses if a.endswith(":0")]


async def test_key_rotation_keeps_old_tokens_valid(store: Store, etcd: EtcdEndpoint) -> None:
    """With the key kept in etcd: rotate, and tokens of both keys still verify."""
    settings = service_settings(etcd.endpoint, store.root, Path("unused"))
    settings.auth.signing_key_file = None
    await bootstrap.ensure_admin(store, settings.auth, ADMIN_PASSWORD)
    service = await start_service(main.build, store, settings, settings.identity)
    channel = make_channel(service.running.address)
    stub = identity_pb2_grpc.IdentityServiceStub(channel)
    login = P.AuthenticateRequest(username="admin", password=ADMIN_PASSWORD, project="admin")
    try:
        before = (await stub.Authenticate(login)).token
        await token.rotate(store)
        after = (await stub.Authenticate(login)).token
        assert jwt.get_unverified_header(before)["kid"] != jwt.get_unverified_header(after)["kid"]
        for each in (before, after):
            await stub.ListProjects(P.ListProjectsRequest(),
                                    metadata=(("authorization", f"Bearer {each}"),))
    finally:
        await channel.close()
        await service.stop()


def _own_password_change(user_id: str, new: str, original: str) -> identity_pb2.UpdateUserRequest:
    return P.UpdateUserRequest(
        user=P.User(meta=resource_pb2.ResourceMeta(id=user_id)),
        update_mask=field_mask_pb2.FieldMask(paths=["password"]),
        password=new, original_password=original)


async def test_own_password_change_needs_the_original(world: World) -> None:
    name = _unique("self-service")
    user_id = await world.make_user(name, world.project_a, "member")
    mine = (("authorization", f"Bearer {await world.login(name, world.project_a)}"),)
    new = "a brand new password"
    missing = world.stub.UpdateUser(_own_password_change(user_id, new, ""), metadata=mine)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await missing
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(refused.value) == {"original_password"}
    wrong = world.stub.UpdateUser(_own_password_change(user_id, new, "not the password"),
                                  metadata=mine)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await wrong
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "original password is wrong"
    # Neither attempt changed anything: the old password still logs in.
    await world.login(name, world.project_a)
    mine = (("authorization", f"Bearer {await world.login(name, world.project_a)}"),)
    await world.stub.UpdateUser(_own_password_change(user_id, new, PASSWORD), metadata=mine)
    await world.login(name, world.project_a, password=new)


async def test_wrong_original_passwords_are_throttled_like_logins(world: World) -> None:
    name = _unique("guessed")
    user_id = await world.make_user(name, world.project_a, "member")
    mine = (("authorization", f"Bearer {await world.login(name, world.project_a)}"),)
    guess = _own_password_change(user_id, "a brand new password", "a guessed password")
    for _ in range(world.settings.auth.max_failures):
        assert await _code(world.stub.UpdateUser(guess, metadata=mine)) == \
            grpc.StatusCode.PERMISSION_DENIED
    right = _own_password_change(user_id, "a brand new password", PASSWORD)
    assert await _code(world.stub.UpdateUser(right, metadata=mine)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    login = P.AuthenticateRequest(username=name, password=PASSWORD, project=world.project_a)
    assert await _code(world.stub.Authenticate(login)) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cloud_admin_sets_a_password_without_the_original(world: World) -> None:
    name = _unique("reset")
    user_id = await world.make_user(name, world.project_a, "member")
    await world.stub.UpdateUser(_own_password_change(user_id, "an admin-chosen password", ""),
                                metadata=world.metadata("cloud_admin"))
    await world.login(name, world.project_a, password="an admin-chosen password")
