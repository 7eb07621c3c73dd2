"""A user's own default_project_id: only a project with a role, and no existence oracle.

A member who names a project id that does not exist, or one that exists but
where they hold no role, gets the very same INVALID_ARGUMENT, so the answer
never reveals which project ids exist; a project they hold a role on is
accepted. A cloud-admin may point any user at any existing project (before
granting roles there, as CreateUser does).
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.client import rpc_errors
from tests.functional.authz.world import World


def _set_default(user_id: str, project_id: str) -> identity_pb2.UpdateUserRequest:
    return identity_pb2.UpdateUserRequest(
        user=identity_pb2.User(meta=resource_pb2.ResourceMeta(id=user_id),
                               default_project_id=project_id),
        update_mask=field_mask_pb2.FieldMask(paths=["default_project_id"]))


async def _refusal(world: World, request: identity_pb2.UpdateUserRequest,
                   metadata: tuple[tuple[str, str], ...]) -> tuple[object, ...]:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await world.stub.UpdateUser(request, metadata=metadata)
    exc = refused.value
    status_details = [value for key, value in exc.trailing_metadata() or ()
                      if key == "grpc-status-details-bin"]
    return exc.code(), exc.details(), rpc_errors.error_reason(exc), status_details


async def test_missing_and_foreign_projects_answer_alike(world: World) -> None:
    name = f"wanderer-{uuid.uuid4().hex[:8]}"
    user_id = await world.make_user(name, world.project_a, "member")
    mine = (("authorization", f"Bearer {await world.login(name, world.project_a)}"),)

    missing = await _refusal(world, _set_default(user_id, str(uuid.uuid4())), mine)
    foreign = await _refusal(world, _set_default(user_id, world.project_b), mine)
    assert missing[0] == grpc.StatusCode.INVALID_ARGUMENT and missing[3], missing
    # Code, message, reason and the whole status detail (field violations) are identical.
    assert missing == foreign

    updated = await world.stub.UpdateUser(_set_default(user_id, world.project_a), metadata=mine)
    assert updated.default_project_id == world.project_a
    cleared = await world.stub.UpdateUser(_set_default(user_id, ""), metadata=mine)
    assert cleared.default_project_id == ""


async def test_cloud_admin_points_a_user_at_any_existing_project(world: World) -> None:
    user_id = await world.make_user(f"pointed-{uuid.uuid4().hex[:8]}", world.project_a, "reader")
    admin = world.metadata("cloud_admin")
    updated = await world.stub.UpdateUser(_set_default(user_id, world.project_b), metadata=admin)
    assert updated.default_project_id == world.project_b
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await world.stub.UpdateUser(_set_default(user_id, str(uuid.uuid4())), metadata=admin)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
