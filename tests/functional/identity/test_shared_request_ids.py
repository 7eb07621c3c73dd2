"""One request_id key space for every service: a key one service used is refused by another.

Identity and the scheduler both keep a project's request ids under
``requests/<project>/<request_id>`` as ``nubis.common.v1.RequestRecord``; the
record names the method that made it, so the same id sent to another method
of another service is ALREADY_EXISTS ``nubis.request_id.reused`` and creates
nothing, while a retry of the first request still returns what it made.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import jwt
import pytest
from google.protobuf import descriptor, message
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import rpc_errors
from services.common import errors, requests
from services.common.store import Txn
from tests.functional.authz.world import World

IDENTITY = "nubis.identity.v1.IdentityService"
SCHEDULER = "nubis.scheduler.v1.SchedulerService"


def _create_project(name: str, request_id: str) -> tuple[str, str, message.Message]:
    meta = resource_pb2.ResourceMeta(name=name)
    return IDENTITY, "CreateProject", identity_pb2.CreateProjectRequest(
        project=identity_pb2.Project(meta=meta), request_id=request_id)


def _create_group(name: str, request_id: str) -> tuple[str, str, message.Message]:
    meta = resource_pb2.ResourceMeta(name=name)
    return SCHEDULER, "CreateServerGroup", scheduler_pb2.CreateServerGroupRequest(
        server_group=scheduler_pb2.ServerGroup(meta=meta, policy=scheduler_pb2.ANTI_AFFINITY),
        request_id=request_id)


Build = Callable[[str, str], tuple[str, str, message.Message]]


def _token_project(world: World) -> str:
    claims = jwt.decode(world.tokens["cloud_admin"], options={"verify_signature": False})
    return str(claims["project"])


async def _named(world: World, service: str, name: str) -> list[str]:
    """Ids of the projects or server groups called `name` (every project, as cloud-admin)."""
    if service == IDENTITY:
        projects = await world.call(IDENTITY, "ListProjects", identity_pb2.ListProjectsRequest(
            all_projects=True, filter=f"name={name}"), "cloud_admin")
        assert isinstance(projects, identity_pb2.ListProjectsResponse)
        return [project.meta.id for project in projects.projects]
    groups = await world.call(SCHEDULER, "ListServerGroups", scheduler_pb2.ListServerGroupsRequest(
        all_projects=True, filter=f"name={name}"), "cloud_admin")
    assert isinstance(groups, scheduler_pb2.ListServerGroupsResponse)
    return [group.meta.id for group in groups.server_groups]


@pytest.mark.parametrize(("first", "second"), [(_create_project, _create_group),
                                               (_create_group, _create_project)],
                         ids=["identity-then-scheduler", "scheduler-then-identity"])
async def test_request_id_of_one_service_is_reused_in_another(
    world: World, first: Build, second: Build
) -> None:
    request_id = str(uuid.uuid4())
    name, other = f"shared-{uuid.uuid4().hex[:8]}", f"shared-{uuid.uuid4().hex[:8]}"
    service, method, request = first(name, request_id)
    made = await world.call(service, method, request, "cloud_admin")
    made_id = str(made.meta.id)  # type: ignore[attr-defined]

    # The second service, same project (the caller's), same key: refused, nothing made.
    second_service, second_method, second_request = second(other, request_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.call(second_service, second_method, second_request, "cloud_admin")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_errors.error_reason(caught.value) == "nubis.request_id.reused"
    assert await _named(world, second_service, other) == []

    # The record still belongs to the first request, whose retry replays it.
    record = await world.store.get(requests.key(_token_project(world), request_id),
                                   request_pb2.RequestRecord)
    assert record.value.method == f"{service}.{method}"
    assert record.value.resource_id == made_id
    again = await world.call(service, method, request, "cloud_admin")
    assert again.meta.id == made_id  # type: ignore[attr-defined]
    assert await _named(world, service, name) == [made_id]


async def test_same_request_under_another_method_is_reused(world: World) -> None:
    """The record's method, not only the fingerprint, decides: same bytes, other RPC, refused."""
    service = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"]
    create_project, create_user = (service.methods_by_name[name]
                                   for name in ("CreateProject", "CreateUser"))
    project_id, request_id = f"p-{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    request = identity_pb2.CreateProjectRequest(request_id=request_id)

    async def create(method: descriptor.MethodDescriptor) -> str:
        idempotency = requests.prepare(world.store, project_id, method, request, request_id)

        async def body(txn: Txn) -> str:
            earlier = await requests.replayed(txn, idempotency)
            if earlier:
                return earlier
            await requests.remember(txn, idempotency, "made-first")
            return "made-now"

        return str(await world.store.atomic(body))

    assert await create(create_project) == "made-now"
    assert await create(create_project) == "made-first"
    with pytest.raises(errors.AlreadyExists) as caught:
        await create(create_user)
    assert caught.value.reason == "nubis.request_id.reused"
    assert caught.value.metadata == {"request_id": request_id}
