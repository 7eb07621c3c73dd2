"""Deleting a user or project while a role or quota is written for it leaves nothing behind.

The grant and the delete run at once on a real etcd; whichever commits first,
afterwards either the subject still exists or none of its assignments do.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from nubis.identity.v1 import identity_pb2

from services.common import errors
from services.common.context import Principal, ProjectId, UserId
from services.common.settings import AuthSettings
from services.common.store import Store
from services.identity import keys, project, quota, role, user

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
    items, _ = await store.list_all(keys.ROLES, identity_pb2.RoleAssignment)
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
        assert await store.find(keys.user(user_id), identity_pb2.User) is None
        assert await _orphans(store, user_id=user_id) == []


async def test_project_delete_racing_a_grant_leaves_no_assignment(store: Store) -> None:
    user_id = await _user(store, "race-member")
    for attempt in range(5):
        project_id = await _project(store, f"race-q{attempt}")
        await asyncio.gather(
            project.delete(store, project_id, 0, token_ttl=60),
            _grant_quietly(store, user_id, project_id, "member"),
        )
        assert await store.find(keys.project(project_id), identity_pb2.Project) is None
        assert await _orphans(store, project_id=project_id) == []


def _limits(project_id: str, ports: int) -> identity_pb2.UpdateQuotaRequest:
    request = identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project_id, limits={"ports": ports}))
    request.update_mask.paths.append("limits.ports")
    return request


async def test_quota_written_after_its_project_was_deleted_is_not_found(store: Store) -> None:
    # The order a racing delete produces: the project existed when UpdateQuota
    # checked it, and is gone by the time its transaction runs.
    project_id = await _project(store, "quota-gone")
    await quota.update_quota(store, CLOUD_ADMIN, _limits(project_id, 3))
    await project.delete(store, project_id, 0, token_ttl=60)
    with pytest.raises(errors.NotFound):
        await store.atomic(quota.limits_writer(project_id, 0, ({"ports": 7}, [], False)))
    assert await store.find(keys.quota_key(project_id), identity_pb2.Quota) is None


async def _update_quota_quietly(store: Store, project_id: str) -> None:
    with contextlib.suppress(errors.NotFound):
        await quota.update_quota(store, CLOUD_ADMIN, _limits(project_id, 9))


async def test_project_delete_racing_a_quota_update_leaves_no_quota(store: Store) -> None:
    for attempt in range(5):
        project_id = await _project(store, f"quota-race-{attempt}")
        await asyncio.gather(project.delete(store, project_id, 0, token_ttl=60),
                             _update_quota_quietly(store, project_id))
        assert await store.find(keys.project(project_id), identity_pb2.Project) is None
        assert await store.find(keys.quota_key(project_id), identity_pb2.Quota) is None
