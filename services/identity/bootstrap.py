"""First start of a cloud: the admin project, the cloud-admin user, the quota defaults and,
when a service credential is configured, the service user other services log in with
(idempotent)."""

from __future__ import annotations

from dataclasses import dataclass

from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, policy
from services.common.context import Principal, ProjectId, UserId
from services.common.settings import AuthSettings, QuotaSettings, ServiceAuthSettings
from services.common.store import Store
from services.identity import project, quota, role, throttle, user


@dataclass(frozen=True)
class Admin:
    """What bootstrap made (or found): ids and whether the password was set now."""

    project_id: str
    user_id: str
    created: bool


# Bootstrap acts before any token exists; this principal stands for the operator.
_OPERATOR = Principal(UserId("bootstrap"), "bootstrap", ProjectId(""),
                      frozenset({policy.Role.CLOUD_ADMIN.value}))


async def ensure_admin(store: Store, settings: AuthSettings, password: str) -> Admin:
    """Make the admin project, user and roles if missing; an existing user keeps its password."""
    admin_project = await _ensure_project(store, settings.admin_project)
    existing = await user.find_by_name(store, settings.admin_user)
    created = existing is None
    if existing is None:
        request = identity_pb2.CreateUserRequest(user=identity_pb2.User(
            meta=resource_pb2.ResourceMeta(name=settings.admin_user, description="cloud admin"),
            default_project_id=admin_project.meta.id,
        ), password=password)
        try:
            existing = await user.create(store, user.PasswordHasher(settings), None, request)
        except errors.AlreadyExists:  # another bootstrap won the race
            existing = await user.find_by_name(store, settings.admin_user)
            created = False
    if existing is None:
        raise errors.Unavailable("admin user vanished during bootstrap")
    await role.grant(store, _OPERATOR, existing.meta.id, "", policy.Role.CLOUD_ADMIN.value)
    await role.grant(store, _OPERATOR, existing.meta.id, admin_project.meta.id,
                     policy.Role.ADMIN.value)
    return Admin(admin_project.meta.id, existing.meta.id, created)


@dataclass(frozen=True)
class ServiceUser:
    """The service user bootstrap made or found; `outcome` says which, for the operator."""

    project_id: str
    user_id: str
    outcome: str
    """"created", "already present", or "password updated" (it differed from the setting)."""


async def ensure_service_user(
    store: Store, auth: AuthSettings, credential: ServiceAuthSettings, password: str
) -> ServiceUser:
    """Make the service user, its project and its cloud-wide `service` role if missing.

    An existing user whose password is not `password` gets it (and its older
    tokens are revoked), so the configured credential is always the one that
    works; a user that already matches is left untouched.
    """
    service_project = await _ensure_project(store, credential.project, "nubis services")
    hasher = user.PasswordHasher(auth)
    existing = await user.find_by_name(store, credential.user)
    outcome = "already present"
    if existing is None:
        request = identity_pb2.CreateUserRequest(user=identity_pb2.User(
            meta=resource_pb2.ResourceMeta(name=credential.user,
                                           description="nubis service-to-service calls"),
            default_project_id=service_project.meta.id,
        ), password=password)
        try:
            existing = await user.create(store, hasher, None, request)
            outcome = "created"
        except errors.AlreadyExists:  # another bootstrap won the race
            existing = await user.find_by_name(store, credential.user)
    if existing is None:
        raise errors.Unavailable("service user vanished during bootstrap")
    if outcome != "created" and not await hasher.verify(
            await user.password_hash(store, existing.meta.id), password):
        await _set_password(store, auth, hasher, existing.meta.id, password)
        outcome = "password updated"
    await role.grant(store, _OPERATOR, existing.meta.id, "", policy.Role.SERVICE.value)
    return ServiceUser(service_project.meta.id, existing.meta.id, outcome)


async def _set_password(store: Store, auth: AuthSettings, hasher: user.PasswordHasher,
                        user_id: str, password: str) -> None:
    change = identity_pb2.User(meta=resource_pb2.ResourceMeta(id=user_id))
    await user.update(
        store, hasher, _OPERATOR, change, ["password"], password, token_ttl=auth.token_ttl,
        original_password="",
        throttle=throttle.LoginThrottle(store, auth.max_failures, auth.throttle_seconds))


async def ensure_quota_defaults(store: Store, settings: QuotaSettings) -> bool:
    """Write the cloud's quota defaults from the settings unless some exist; True if written."""
    return await quota.ensure_defaults(store, settings.defaults)


async def _ensure_project(store: Store, name: str,
                          description: str = "operators") -> identity_pb2.Project:
    try:
        return await project.resolve(store, name)
    except errors.NotFound:
        pass
    request = identity_pb2.CreateProjectRequest(project=identity_pb2.Project(
        meta=resource_pb2.ResourceMeta(name=name, description=description)))
    try:
        return await project.create(store, None, request)
    except errors.AlreadyExists:
        return await project.resolve(store, name)
