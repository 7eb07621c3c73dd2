"""Passwords and tokens never reach the logs, whatever happens to an authentication."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.common import logging as nubis_logging
from services.common.settings import load_settings
from tests.functional.authz.world import World


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    buffer = io.StringIO()
    nubis_logging.configure_logging(load_settings(log_level="debug", log_json=True),
                                    stream=buffer)
    try:
        yield buffer
    finally:
        nubis_logging.configure_logging(load_settings())


async def test_authentication_logs_no_secret(world: World, captured: io.StringIO) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    wrong = f"wrong-{uuid.uuid4().hex}"
    new_password = f"new-{uuid.uuid4().hex}"
    admin = world.metadata("cloud_admin")
    name = f"logged-{uuid.uuid4().hex[:8]}"
    created = await world.stub.CreateUser(identity_pb2.CreateUserRequest(
        user=identity_pb2.User(meta=resource_pb2.ResourceMeta(name=name),
                               default_project_id=world.project_a),
        password=password), metadata=admin)
    await world.stub.GrantRole(identity_pb2.GrantRoleRequest(
        user_id=created.meta.id, project_id=world.project_a, role="member"), metadata=admin)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await world.stub.Authenticate(identity_pb2.AuthenticateRequest(
            username=name, password=wrong))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = await world.stub.Authenticate(identity_pb2.AuthenticateRequest(
        username=name, password=password))
    mine = (("authorization", f"Bearer {reply.token}"),)
    await world.stub.GetProject(identity_pb2.GetProjectRequest(id=world.project_a),
                                metadata=mine)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await world.stub.UpdateUser(identity_pb2.UpdateUserRequest(
            user=identity_pb2.User(meta=resource_pb2.ResourceMeta(id=created.meta.id)),
            update_mask=field_mask_pb2.FieldMask(paths=["password"]), password=new_password,
            original_password=wrong,
        ), metadata=mine)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await world.stub.UpdateUser(identity_pb2.UpdateUserRequest(
        user=identity_pb2.User(meta=resource_pb2.ResourceMeta(id=created.meta.id)),
        update_mask=field_mask_pb2.FieldMask(paths=["password"]), password=new_password,
        original_password=password,
    ), metadata=mine)
    await world.stub.RevokeToken(identity_pb2.RevokeTokenRequest(token=reply.token),
                                 metadata=admin)

    logs = captured.getvalue()
    assert "Authenticate" in logs and "UpdateUser" in logs, "the calls were not logged at all"
    signature = reply.token.rsplit(".", 1)[-1]
    for secret in (password, wrong, new_password, reply.token, signature):
        assert secret not in logs
