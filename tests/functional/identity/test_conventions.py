"""Identity keeps the API conventions' promises: request_id, filter, revision, field masks.

Each test drives the real service over gRPC and looks at etcd where the promise
is about what is stored (one resource per request_id, the request key itself).
"""

from __future__ import annotations

import asyncio
import uuid

import grpc
import jwt
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.identity.v1 import identity_pb2

from services.client import rpc_errors
from services.common import requests
from services.identity import keys
from tests.functional.authz.world import PASSWORD, World

P = identity_pb2


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _new_project(name: str, request_id: str = "", **labels: str) -> P.CreateProjectRequest:
    meta = resource_pb2.ResourceMeta(name=name, labels=labels)
    return P.CreateProjectRequest(project=P.Project(meta=meta), request_id=request_id)


async def _projects_named(world: World, name: str) -> list[P.Project]:
    reply = await world.stub.ListProjects(
        P.ListProjectsRequest(all_projects=True, filter=f"name={name}"),
        metadata=world.metadata("cloud_admin"))
    return list(reply.projects)


def _admin_project(world: World) -> str:
    """The project the cloud admin's token is scoped to (where its request keys live)."""
    claims = jwt.decode(world.tokens["cloud_admin"], options={"verify_signature": False})
    return str(claims["project"])


async def test_create_project_retry_returns_the_first_project(world: World) -> None:
    admin = world.metadata("cloud_admin")
    name, key = _unique("idem"), str(uuid.uuid4())
    first = await world.stub.CreateProject(_new_project(name, key), metadata=admin)
    again = await world.stub.CreateProject(_new_project(name, key), metadata=admin)
    assert again.meta.id == first.meta.id
    assert [p.meta.id for p in await _projects_named(world, name)] == [first.meta.id]
    record = await world.store.get(requests.key(_admin_project(world), key),
                                   request_pb2.RequestRecord)
    assert record.value.resource_id == first.meta.id
    assert record.value.method == "nubis.identity.v1.IdentityService.CreateProject"


async def test_racing_retries_create_one_project(world: World) -> None:
    admin = world.metadata("cloud_admin")
    name, key = _unique("race"), str(uuid.uuid4())
    replies = await asyncio.gather(*[
        world.stub.CreateProject(_new_project(name, key), metadata=admin) for _ in range(6)
    ])
    assert len({reply.meta.id for reply in replies}) == 1
    assert len(await _projects_named(world, name)) == 1


async def test_request_id_reused_for_another_request_is_already_exists(world: World) -> None:
    admin = world.metadata("cloud_admin")
    key = str(uuid.uuid4())
    await world.stub.CreateProject(_new_project(_unique("one"), key), metadata=admin)
    other = _unique("two")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.CreateProject(_new_project(other, key), metadata=admin)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_errors.error_reason(caught.value) == "nubis.request_id.reused"
    assert await _projects_named(world, other) == []
    # The same key from another project is another key.
    user = P.CreateUserRequest(user=P.User(meta=resource_pb2.ResourceMeta(name=_unique("u"))),
                               password=PASSWORD, request_id=key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.CreateUser(user, metadata=admin)
    reason = rpc_errors.error_reason(caught.value)
    assert reason == "nubis.request_id.reused", "same project, other method"


async def test_create_user_retry_returns_the_first_user(world: World) -> None:
    admin = world.metadata("cloud_admin")
    key = str(uuid.uuid4())
    request = P.CreateUserRequest(user=P.User(meta=resource_pb2.ResourceMeta(name=_unique("u"))),
                                  password=PASSWORD, request_id=key)
    first = await world.stub.CreateUser(request, metadata=admin)
    again = await world.stub.CreateUser(request, metadata=admin)
    assert (again.meta.id, again.state) == (first.meta.id, P.User.ENABLED)
    stored = await world.store.get(requests.key(_admin_project(world), key),
                                   request_pb2.RequestRecord)
    assert PASSWORD not in str(stored.value)


async def test_validate_only_writes_nothing(world: World) -> None:
    admin = world.metadata("cloud_admin")
    name = _unique("dry")
    request = _new_project(name, str(uuid.uuid4()))
    request.validate_only = True
    reply = await world.stub.CreateProject(request, metadata=admin)
    assert reply.meta.name == name and not reply.meta.id
    assert await _projects_named(world, name) == []
    taken = _new_project(world.names["a_admin"])
    taken.project.meta.name = (await world.stub.GetProject(
        P.GetProjectRequest(id=world.project_a), metadata=admin)).meta.name
    taken.validate_only = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.CreateProject(taken, metadata=admin)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_filter_and_pages_over_projects(world: World) -> None:
    admin = world.metadata("cloud_admin")
    tag = uuid.uuid4().hex[:8]
    made = [
        (await world.stub.CreateProject(_new_project(_unique("f"), tier=tag), metadata=admin))
        for _ in range(5)
    ]
    disabled = made[0].meta.id
    await world.stub.UpdateProject(P.UpdateProjectRequest(
        project=P.Project(meta=resource_pb2.ResourceMeta(id=disabled), enabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["enabled"])), metadata=admin)
    seen: list[P.Project] = []
    token = ""
    while True:
        reply = await world.stub.ListProjects(P.ListProjectsRequest(
            all_projects=True, filter=f"label.tier={tag} state=ENABLED", page_size=2,
            page_token=token), metadata=admin)
        assert len(reply.projects) <= 2
        seen += reply.projects
        token = reply.next_page_token
        if not token:
            break
    ids = [p.meta.id for p in seen]
    assert ids == sorted(p.meta.id for p in made[1:])
    assert all(p.state == P.Project.ENABLED for p in seen)
    off = await world.stub.ListProjects(P.ListProjectsRequest(
        all_projects=True, filter=f"label.tier={tag} state=DISABLED,ENABLED"), metadata=admin)
    assert len(off.projects) == 5
    one = await world.stub.ListProjects(P.ListProjectsRequest(
        all_projects=True, filter=f"state=DISABLED label.tier={tag}"), metadata=admin)
    assert [(p.meta.id, p.state) for p in one.projects] == [(disabled, P.Project.DISABLED)]
    # Whether it lists every project or only the caller's, a token the listing
    # never returned is bad input, not an empty or a first page.
    paged = await world.stub.ListProjects(P.ListProjectsRequest(all_projects=True, page_size=1),
                                          metadata=admin)
    assert paged.next_page_token
    users = await world.stub.ListUsers(P.ListUsersRequest(all_projects=True, page_size=1),
                                       metadata=admin)
    for caller, all_projects, token in [
        ("a_member", False, "bogus"), ("a_member", False, paged.next_page_token),
        ("cloud_admin", False, "bogus"), ("cloud_admin", True, "bogus"),
        ("cloud_admin", True, users.next_page_token),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.ListProjects(P.ListProjectsRequest(
                all_projects=all_projects, page_token=token), metadata=world.metadata(caller))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (caller, token)


async def test_project_members_page_and_filter(world: World) -> None:
    """A project admin's ListUsers is scoped in memory: it still pages and filters."""
    caller = world.metadata("a_admin")
    everyone = await world.stub.ListUsers(P.ListUsersRequest(), metadata=caller)
    assert len(everyone.users) >= 4 and not everyone.next_page_token
    seen, token = [], ""
    while True:
        reply = await world.stub.ListUsers(P.ListUsersRequest(page_size=1, page_token=token),
                                           metadata=caller)
        seen += [u.meta.id for u in reply.users]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [u.meta.id for u in everyone.users] == sorted(seen)
    store_token = (await world.stub.ListUsers(P.ListUsersRequest(all_projects=True, page_size=1),
                                              metadata=world.metadata("cloud_admin")))
    for token in ("bogus", store_token.next_page_token):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.ListUsers(P.ListUsersRequest(page_token=token), metadata=caller)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
    named = await world.stub.ListUsers(
        P.ListUsersRequest(filter=f"name={world.names['a_member']}"), metadata=caller)
    assert [u.meta.id for u in named.users] == [world.users["a_member"]]


async def test_role_assignments_page_and_filter(world: World) -> None:
    caller = world.metadata("a_admin")
    readers = await world.stub.ListRoleAssignments(
        P.ListRoleAssignmentsRequest(filter="role=reader"), metadata=caller)
    assert {a.user_id for a in readers.assignments} >= {world.users["a_reader"]}
    assert {a.role for a in readers.assignments} == {"reader"}
    seen, token = [], ""
    while True:
        reply = await world.stub.ListRoleAssignments(
            P.ListRoleAssignmentsRequest(page_size=2, page_token=token), metadata=caller)
        seen += [(a.user_id, a.role) for a in reply.assignments]
        token = reply.next_page_token
        if not token:
            break
    every = await world.stub.ListRoleAssignments(P.ListRoleAssignmentsRequest(), metadata=caller)
    assert seen == [(a.user_id, a.role) for a in every.assignments]
    assert len(seen) >= 5
    users = await world.stub.ListUsers(P.ListUsersRequest(page_size=1), metadata=caller)
    for token in ("bogus", users.next_page_token):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await world.stub.ListRoleAssignments(
                P.ListRoleAssignmentsRequest(page_token=token), metadata=caller)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
    mine = await world.stub.ListRoleAssignments(P.ListRoleAssignmentsRequest(
        user_id=world.users["a_member"], filter="role=member,admin"), metadata=caller)
    assert [(a.user_id, a.role) for a in mine.assignments] == [(world.users["a_member"], "member")]


async def test_stale_revision_is_aborted(world: World) -> None:
    admin = world.metadata("cloud_admin")
    project = await world.stub.CreateProject(_new_project(_unique("rev")), metadata=admin)
    stale = project.meta.revision
    renamed = P.Project(meta=resource_pb2.ResourceMeta(
        id=project.meta.id, name=_unique("renamed"), revision=stale))
    current = await world.stub.UpdateProject(P.UpdateProjectRequest(
        project=renamed, update_mask=field_mask_pb2.FieldMask(paths=["meta.name"])),
        metadata=admin)
    assert current.meta.name == renamed.meta.name and current.meta.revision > stale
    for call in (
        world.stub.UpdateProject(P.UpdateProjectRequest(
            project=renamed, update_mask=field_mask_pb2.FieldMask(paths=["meta.description"])),
            metadata=admin),
        world.stub.DeleteProject(P.DeleteProjectRequest(id=project.meta.id, revision=stale),
                                 metadata=admin),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert rpc_errors.error_reason(caught.value) == "nubis.conflict"
    await world.stub.DeleteProject(P.DeleteProjectRequest(
        id=project.meta.id, revision=current.meta.revision), metadata=admin)
    assert await world.store.find(keys.project(project.meta.id), P.Project) is None


async def test_user_update_and_delete_honour_revision_and_mask(world: World) -> None:
    admin = world.metadata("cloud_admin")
    user = await world.stub.CreateUser(P.CreateUserRequest(
        user=P.User(meta=resource_pb2.ResourceMeta(name=_unique("u")), email="a@example.org"),
        password=PASSWORD), metadata=admin)
    changed = P.User(meta=resource_pb2.ResourceMeta(
        id=user.meta.id, description="new", revision=user.meta.revision), email="b@example.org")
    reply = await world.stub.UpdateUser(P.UpdateUserRequest(
        user=changed, update_mask=field_mask_pb2.FieldMask(paths=["meta.description"])),
        metadata=admin)
    assert (reply.meta.description, reply.email) == ("new", "a@example.org")
    stale = world.stub.UpdateUser(P.UpdateUserRequest(
        user=changed, update_mask=field_mask_pb2.FieldMask(paths=["email"])), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stale
    assert caught.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.stub.DeleteUser(P.DeleteUserRequest(id=user.meta.id,
                                                        revision=user.meta.revision),
                                    metadata=admin)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    await world.stub.DeleteUser(P.DeleteUserRequest(id=user.meta.id,
                                                    revision=reply.meta.revision), metadata=admin)
