"""Users: cloud-wide accounts with a slow-hashed password; roles tie them to projects."""

from __future__ import annotations

import asyncio

import argon2
from nubis.identity.v1 import identity_pb2

from services.common import errors, filtering, pages, policy, requests, resources
from services.common.context import Principal
from services.common.settings import AuthSettings
from services.common.store import Store, Txn, Versioned
from services.identity import keys, revocation, role
from services.identity.throttle import LoginThrottle

UPDATABLE = ("description", "labels", "email", "default_project_id", "enabled", "password")
# What users may change about themselves; the rest is for cloud-admins.
SELF_SERVICE = frozenset({"description", "email", "default_project_id", "password"})
_MIN_PASSWORD = 8
CREATE_METHOD = resources.method(identity_pb2.DESCRIPTOR, "IdentityService", "CreateUser")
# Names the page tokens of an in-memory listing, so another listing's token is refused.
PAGE_LISTING = "users"
_MAX_PASSWORD = 1024
_STATES = identity_pb2.User.State.DESCRIPTOR
FILTER_KEYS: filtering.Keys = {
    "name": None, "state": filtering.enum_names(_STATES), "email": None,
    "default_project_id": None,
}


class PasswordHasher:
    """argon2id with the configured cost; hashing runs off the event loop."""

    def __init__(self, settings: AuthSettings) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=settings.hash_time_cost,
            memory_cost=settings.hash_memory_kib,
            parallelism=settings.hash_parallelism,
        )
        # Verified against when a user does not exist, so that a wrong name costs
        # as much time as a wrong password and names cannot be probed by timing.
        self._decoy = self._hasher.hash("nubis-decoy-password")

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Constant-time check (argon2 compares digests with a constant-time compare)."""
        target = password_hash or self._decoy
        try:
            await asyncio.to_thread(self._hasher.verify, target, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
        return password_hash is not None


def check_password(violations: errors.ViolationCollector, field: str, password: str) -> None:
    if not _MIN_PASSWORD <= len(password) <= _MAX_PASSWORD:
        violations.add(field, f"must be {_MIN_PASSWORD}-{_MAX_PASSWORD} characters")


def _validate(user: identity_pb2.User, fields: tuple[str, ...], password: str | None) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields:
        resources.check_name(violations, "user.meta.name", user.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "user.meta.labels", dict(user.meta.labels))
    if "email" in fields and len(user.email) > 254:
        violations.add("user.email", "at most 254 characters")
    if "default_project_id" in fields and user.default_project_id:
        resources.check_id(user.default_project_id, "user.default_project_id")
    if password is not None:
        check_password(violations, "password", password)
    violations.check("invalid user")


def _state(enabled: bool) -> identity_pb2.User.State.ValueType:
    return identity_pb2.User.ENABLED if enabled else identity_pb2.User.DISABLED


def _with_revision(item: Versioned[identity_pb2.User]) -> identity_pb2.User:
    user = identity_pb2.User()
    user.CopyFrom(item.value)
    user.meta.revision = item.mod_revision
    user.state = _state(user.enabled)
    return user


def _matches(chosen: filtering.Filter, user: identity_pb2.User) -> bool:
    fields = {"name": user.meta.name, "state": filtering.enum_name(_STATES, _state(user.enabled)),
              "email": user.email, "default_project_id": user.default_project_id}
    return chosen.matches(fields, user.meta.labels)


async def create(
    store: Store, hasher: PasswordHasher, principal: Principal | None,
    request: identity_pb2.CreateUserRequest,
) -> identity_pb2.User:
    """A new user with a unique name; the password is stored only as an argon2id hash.

    Idempotent under request_id (the password is left out of the comparison).
    """
    _validate(request.user, ("name", "labels", "email", "default_project_id"), request.password)
    user = identity_pb2.User(
        meta=resources.fresh_meta(request.user.meta), enabled=True, state=identity_pb2.User.ENABLED,
        default_project_id=request.user.default_project_id, email=request.user.email,
    )
    idempotency = requests.prepare(
        store, resources.scope(principal), CREATE_METHOD, request, request.request_id,
        secrets=("password",), validate_only=request.validate_only)
    password_hash = "" if request.validate_only else await hasher.hash(request.password)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        if await txn.get(keys.user_name(user.meta.name), identity_pb2.NameIndex):
            raise errors.AlreadyExists(
                f"user name {user.meta.name!r} is taken",
                reason="nubis.identity.name_taken", metadata={"name": user.meta.name},
            )
        await _require_project(txn, user.default_project_id)
        if request.validate_only:
            return ""
        credential = identity_pb2.Credential(user_id=user.meta.id, password_hash=password_hash)
        # A put: the read above guards the name, and a lost race re-runs this body
        # to find the winner's request record (see project.create).
        txn.put(keys.user_name(user.meta.name), identity_pb2.NameIndex(id=user.meta.id))
        txn.create(keys.user(user.meta.id), user)
        txn.create(keys.credential(user.meta.id), credential)
        await requests.remember(txn, idempotency, user.meta.id)
        return user.meta.id

    user_id = await store.atomic(body)
    if not user_id:  # validate_only: what would be created, with no id
        user.meta.ClearField("id")
        return user
    return await get(store, None, user_id)


async def _require_project(txn: Txn, project_id: str) -> None:
    if project_id and await txn.get(keys.project(project_id), identity_pb2.Project) is None:
        raise errors.NotFound(f"project {project_id} not found", metadata={"id": project_id})


_PROJECT_ROLES = tuple(r.value for r in policy.Role if r not in policy.CLOUD_ROLES)


async def _check_default_project(
    txn: Txn, principal: Principal, user_id: str, project_id: str
) -> None:
    """A cloud-admin may name any project; others only one the user holds a role on.

    For those others, a project that does not exist and one without a role
    answer the same INVALID_ARGUMENT (as Keystone refuses a bad default
    project), so the answer never tells which project ids exist.
    """
    if not project_id:
        return
    if policy.is_cloud_admin(principal):
        await _require_project(txn, project_id)
        return
    found = await txn.get(keys.project(project_id), identity_pb2.Project)
    held = [await txn.get(keys.role(project_id, user_id, name), identity_pb2.RoleAssignment)
            for name in _PROJECT_ROLES]
    if found is None or not any(held):
        raise errors.InvalidArgument(
            "default_project_id must name a project the user has a role on",
            violations=[errors.FieldViolation("user.default_project_id",
                                              "not a project the user has a role on")],
        )


async def _visible(store: Store, principal: Principal, user_id: str) -> bool:
    """Users see themselves; project members see the project's members; cloud-admin all."""
    if user_id == principal.user_id or policy.is_cloud_admin(principal):
        return True
    return user_id in await role.project_member_ids(store, principal.project_id)


async def get(store: Store, principal: Principal | None, user_id: str) -> identity_pb2.User:
    resources.check_id(user_id)
    item = await store.find(keys.user(user_id), identity_pb2.User)
    hidden = principal is not None and not await _visible(store, principal, user_id)
    if item is None or hidden:
        raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
    return _with_revision(item)


async def find_by_name(store: Store, name: str) -> identity_pb2.User | None:
    if not resources.is_name(name):
        return None  # no user has it, and it might not even form a store key
    index = await store.find(keys.user_name(name), identity_pb2.NameIndex)
    if index is None:
        return None
    item = await store.find(keys.user(index.value.id), identity_pb2.User)
    return item.value if item else None


async def password_hash(store: Store, user_id: str) -> str | None:
    item = await store.find(keys.credential(user_id), identity_pb2.Credential)
    return item.value.password_hash if item else None


async def list_users(
    store: Store, principal: Principal, request: identity_pb2.ListUsersRequest
) -> tuple[list[identity_pb2.User], str]:
    """Users with a role on the caller's project, or every user (cloud-admin, all_projects)."""
    size = pages.page_size(request.page_size)
    chosen = filtering.parse(request.filter, FILTER_KEYS)
    scope = policy.list_scope(principal, all_projects=request.all_projects)
    if scope is None:
        found, next_token = await pages.filtered_page(
            store, keys.USERS, identity_pb2.User, lambda item: _matches(chosen, item.value),
            size=size, page_token=request.page_token,
        )
        return [_with_revision(item) for item in found], next_token
    members = await role.project_member_ids(store, scope)
    items = [await store.find(keys.user(user_id), identity_pb2.User) for user_id in members]
    users = sorted((_with_revision(item) for item in items if item is not None),
                   key=lambda user: user.meta.id)
    matching = [user for user in users if _matches(chosen, user)]
    return pages.page_of(matching, lambda user: user.meta.id, size=size,
                         page_token=request.page_token, listing=PAGE_LISTING,
                         well_formed=resources.is_uuid)


async def update(
    store: Store, hasher: PasswordHasher, principal: Principal, request: identity_pb2.User,
    mask: list[str], password: str, *, token_ttl: int, original_password: str,
    throttle: LoginThrottle,
) -> identity_pb2.User:
    """Change the masked fields; disabling a user or changing a password revokes its tokens."""
    user_id = request.meta.id
    resources.check_id(user_id, "user.meta.id")
    fields = tuple(resources.check_mask(mask, UPDATABLE))
    _validate(request, fields, password if "password" in fields else None)
    if not await _visible(store, principal, user_id):
        raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
    _check_self_service(principal, user_id, fields)
    if "password" in fields and _needs_original(principal, user_id):
        await _check_original(store, hasher, throttle, user_id, original_password)
    new_hash = await hasher.hash(password) if "password" in fields else None

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.user(user_id), identity_pb2.User)
        if current is None:
            raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
        _check_revision(request.meta.revision, current.mod_revision)
        user = identity_pb2.User()
        user.CopyFrom(current.value)
        _apply(user, request, fields)
        if "default_project_id" in fields:
            await _check_default_project(txn, principal, user_id, user.default_project_id)
        if new_hash is not None:
            txn.put(keys.credential(user_id),
                    identity_pb2.Credential(user_id=user_id, password_hash=new_hash))
        if new_hash is not None or (current.value.enabled and not user.enabled):
            await revocation.revoke_subject(store, txn, "user", user_id, token_ttl=token_ttl)
        txn.put(keys.user(user_id), user)

    await store.atomic(body)
    return await get(store, None, user_id)


def _check_revision(expected: int, actual: int) -> None:
    if expected and expected != actual:
        raise errors.Conflict(
            "the user changed since it was read; read it again and retry",
            metadata={"expected_revision": str(expected), "revision": str(actual)},
        )


def _check_self_service(principal: Principal, user_id: str, fields: tuple[str, ...]) -> None:
    if policy.is_cloud_admin(principal):
        return
    if user_id != principal.user_id or not set(fields) <= SELF_SERVICE:
        raise errors.PermissionDenied(
            "only a cloud-admin may change other users or these fields",
            reason="nubis.policy.denied",
        )


def _needs_original(principal: Principal, user_id: str) -> bool:
    # A stolen token alone must not take an account over, so users prove they
    # know their password; a cloud-admin resets passwords by design.
    return principal.user_id == user_id and not policy.is_cloud_admin(principal)


async def _check_original(
    store: Store, hasher: PasswordHasher, throttle: LoginThrottle, user_id: str,
    original: str,
) -> None:
    if not original:
        raise errors.InvalidArgument(
            "the current password is needed to change your own password",
            violations=[errors.FieldViolation("original_password",
                                              "required when changing your own password")],
        )
    account = await store.find(keys.user(user_id), identity_pb2.User)
    if account is None:
        raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
    # The login throttle's key, so guesses here and at Authenticate add up.
    name = account.value.meta.name
    await throttle.attempt(name)
    if not await hasher.verify(await password_hash(store, user_id), original):
        raise errors.PermissionDenied("original password is wrong",
                                      reason="nubis.auth.original_password_wrong")
    await throttle.succeeded(name)


def _apply(user: identity_pb2.User, request: identity_pb2.User, fields: tuple[str, ...]) -> None:
    if "description" in fields:
        user.meta.description = request.meta.description
    if "labels" in fields:
        user.meta.labels.clear()
        user.meta.labels.update(request.meta.labels)
    if "email" in fields:
        user.email = request.email
    if "default_project_id" in fields:
        user.default_project_id = request.default_project_id
    if "enabled" in fields:
        user.enabled = request.enabled
    user.state = _state(user.enabled)
    user.meta.update_time.CopyFrom(resources.now())
    user.meta.revision = 0


async def delete(store: Store, user_id: str, revision: int, *, token_ttl: int) -> None:
    """Remove the user, its password and role assignments; its tokens are revoked."""
    resources.check_id(user_id)
    assignments, _ = await store.list_all(keys.ROLES, identity_pb2.RoleAssignment)
    mine = [item.key for item in assignments if item.value.user_id == user_id]

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.user(user_id), identity_pb2.User)
        if current is None:
            raise errors.NotFound(f"user {user_id} not found", metadata={"id": user_id})
        _check_revision(revision, current.mod_revision)
        txn.delete(keys.user(user_id))
        txn.delete(keys.user_name(current.value.meta.name))
        if await txn.get(keys.credential(user_id), identity_pb2.Credential):
            txn.delete(keys.credential(user_id))
        for key in mine:
            txn.delete(key)
        await revocation.revoke_subject(store, txn, "user", user_id, token_ttl=token_ttl)

    await store.atomic(body)
    await role.sweep(store, keys.ROLES, lambda assignment: assignment.user_id == user_id)
