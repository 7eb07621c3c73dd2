"""Deleting a user or project while a role is granted to it leaves no assignment behind.

The grant and the delete run at once on a real etcd; whichever commits first,
afterwards either the subject still exists or none of its assignments do.
"""

from __future__ import annotations

import asyncio
import contextlib

from nubis.identity.v1 import identity_pb2

from services.common import errors
from services.common.context import Principal, ProjectId, UserId
from services.common.settings import AuthSettings
from services.common.store import Store
from services.identity import paths, project, role, user

CLOUD_ADMIN = Principal(UserId("op"), "op", ProjectId(""), frozenset({"cloud-admin"}))
_HASHER = user.PasswordHasher(
    AuthSettings(hash_time_cost=1, hash_memory_kib=8192, hash_parallelism=1))


async def _project(store: Store, name: str) -> str:
    request = identity_pb2.CreateProjectRequest()
    request.project.meta.name = name
    return (await project.create(store, CLOUD_ADMIN, request)).meta.id


async def _user(store: Store, name: str) -> str:
    request = identity_pb2.CreateUserRequest(password="a-long-password")
    request.user.meta.name = name
    return (await user.create(store, _HASHER, CLOUD_ADMIN, request)).meta.id


async def _grant_quietly(store: Store, user_id: str, project_id: str, name: str) -> None:
    # Losing the race to the delete is a fine outcome: the subject is gone.
    with contextlib.suppress(errors.NotFound):
        await role.grant(store, CLOUD_ADMIN, user_id, project_id, name)


async def _orphans(store: Store, user_id: str = "", project_id: str = "") -> list[str]:
    items, _ = await store.list_all(paths.ROLES, identity_pb2.RoleAssignment)
    return [item.key for item in items
            if (user_id and item.value.user_id == user_id)
            or (project_id and item.value.project_id == project_id)]


async def test_user_delete_racing_a_grant_leaves_no_assignment(store: Store) -> None:
    project_id = await _project(store, "race-p")
    for attempt in range(5):
        user_id = await _user(store, f"race-u{attempt}")
        await role.grant(store, CLOUD_ADMIN, user_id, project_id, "reader")
        await asyncio.gather(
            user.delete(store, user_id, 0, token_ttl=60),
            _grant_quietly(store, user_id, project_id, "member"),
        )
        assert await store.find(paths.user(user_id), identity_pb2.User) is None
        assert await _orphans(store, user_id=user_id) == []


async def test_project_delete_racing_a_grant_leaves_no_assignment(store: Store) -> None:
    user_id = await _user(store, "race-member")
    for attempt in range(5):
        project_id = await _project(store, f"race-q{attempt}")
        await asyncio.gather(
            project.delete(store, project_id, 0, token_ttl=60),
            _grant_quietly(store, user_id, project_id, "member"),
        )
        assert await store.find(paths.project(project_id), identity_pb2.Project) is None
        assert await _orphans(store, project_id=project_id) == []
