"""Projects: the tenants that own resources, quotas and role assignments."""

from __future__ import annotations

from nubis.identity.v1 import identity_pb2

from services.common import errors, filtering, pages, policy, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.identity import keys, revocation, role

UPDATABLE = ("name", "description", "labels", "enabled")
_STATES = identity_pb2.Project.State.DESCRIPTOR
FILTER_KEYS: filtering.Keys = {"name": None, "state": filtering.enum_names(_STATES)}
CREATE_METHOD = resources.method(identity_pb2.DESCRIPTOR, "IdentityService", "CreateProject")
# Names the page tokens of an in-memory listing, so another listing's token is refused.
PAGE_LISTING = "projects"


def _validate(project: identity_pb2.Project, fields: tuple[str, ...] = UPDATABLE) -> None:
    violations = errors.ViolationCollector()
    if "name" in fields:
        resources.check_name(violations, "project.meta.name", project.meta.name)
    if "labels" in fields:
        resources.check_labels(violations, "project.meta.labels", dict(project.meta.labels))
    if "description" in fields and len(project.meta.description) > 1024:
        violations.add("project.meta.description", "at most 1024 characters")
    violations.check("invalid project")


def _state(enabled: bool) -> identity_pb2.Project.State.ValueType:
    return identity_pb2.Project.ENABLED if enabled else identity_pb2.Project.DISABLED


def _with_revision(item: Versioned[identity_pb2.Project]) -> identity_pb2.Project:
    project = identity_pb2.Project()
    project.CopyFrom(item.value)
    project.meta.revision = item.mod_revision
    project.state = _state(project.enabled)
    return project


def _matcher(text: str) -> filtering.Filter:
    return filtering.parse(text, FILTER_KEYS)


def _matches(chosen: filtering.Filter, project: identity_pb2.Project) -> bool:
    fields = {"name": project.meta.name,
              "state": filtering.enum_name(_STATES, _state(project.enabled))}
    return chosen.matches(fields, project.meta.labels)


async def create(
    store: Store, principal: Principal | None, request: identity_pb2.CreateProjectRequest
) -> identity_pb2.Project:
    """A new enabled project; its name must be unused. Idempotent under request_id."""
    _validate(request.project)
    project = identity_pb2.Project(meta=resources.fresh_meta(request.project.meta), enabled=True,
                                   state=identity_pb2.Project.ENABLED)
    project.meta.project_id = project.meta.id
    idempotency = requests.prepare(
        store, resources.scope(principal), CREATE_METHOD, request, request.request_id,
        validate_only=request.validate_only)

    async def body(txn: Txn) -> str:
        earlier = await requests.replayed(txn, idempotency)
        if earlier:
            return earlier
        if await txn.get(keys.project_name(project.meta.name), identity_pb2.NameIndex):
            raise errors.AlreadyExists(
                f"project name {project.meta.name!r} is taken",
                reason="nubis.identity.name_taken", metadata={"name": project.meta.name},
            )
        if request.validate_only:
            return ""
        # A put, not a create: the read above already makes the commit require the
        # name to be free, and a lost race then re-runs this body, which finds the
        # winner's request record (a create would fail at once with ALREADY_EXISTS).
        index = identity_pb2.NameIndex(id=project.meta.id)
        txn.put(keys.project_name(project.meta.name), index)
        txn.create(keys.project(project.meta.id), project)
        await requests.remember(txn, idempotency, project.meta.id)
        return project.meta.id

    project_id = await store.atomic(body)
    if not project_id:  # validate_only: what would be created, with no id
        project.meta.ClearField("id")
        project.meta.ClearField("project_id")
        return project
    return await get(store, None, project_id)


async def get(store: Store, principal: Principal | None, project_id: str) -> identity_pb2.Project:
    """The project, if it exists and `principal` (None: internal use) may see it."""
    resources.check_id(project_id)
    if principal is not None:
        policy.require_visible(principal, project_id, "project", project_id)
    item = await store.find(keys.project(project_id), identity_pb2.Project)
    if item is None:
        raise errors.NotFound(f"project {project_id} not found", metadata={"id": project_id})
    return _with_revision(item)


async def resolve(store: Store, id_or_name: str) -> identity_pb2.Project:
    """A project by id or by name (Authenticate accepts either)."""
    # Every id is also a well-formed name; anything else names no project and
    # might not even form a store key.
    if not resources.is_name(id_or_name):
        raise errors.NotFound("project not found", metadata={"id": id_or_name})
    index = await store.find(keys.project_name(id_or_name), identity_pb2.NameIndex)
    project_id = index.value.id if index is not None else id_or_name
    item = await store.find(keys.project(project_id), identity_pb2.Project)
    if item is None:
        raise errors.NotFound(f"project {id_or_name} not found", metadata={"id": id_or_name})
    return _with_revision(item)


async def list_projects(
    store: Store, principal: Principal, request: identity_pb2.ListProjectsRequest
) -> tuple[list[identity_pb2.Project], str]:
    """The caller's project, or every project (cloud-admin with all_projects), by id."""
    size = pages.page_size(request.page_size)
    chosen = _matcher(request.filter)
    scope = policy.list_scope(principal, all_projects=request.all_projects)
    if scope is not None:
        item = await store.find(keys.project(scope), identity_pb2.Project)
        mine = [_with_revision(item)] if item else []
        # Paged like any listing, so a token it never returned is refused here too.
        return pages.page_of([project for project in mine if _matches(chosen, project)],
                             lambda project: project.meta.id, size=size,
                             page_token=request.page_token, listing=PAGE_LISTING,
                             well_formed=resources.is_uuid)
    found, next_token = await pages.filtered_page(
        store, keys.PROJECTS, identity_pb2.Project,
        lambda item: _matches(chosen, item.value), size=size, page_token=request.page_token,
    )
    return [_with_revision(item) for item in found], next_token


async def update(
    store: Store, principal: Principal, request: identity_pb2.Project, mask: list[str], *,
    token_ttl: int,
) -> identity_pb2.Project:
    """Change the masked fields; disabling a project revokes all of its tokens."""
    project_id = request.meta.id
    resources.check_id(project_id, "project.meta.id")
    fields = tuple(resources.check_mask(mask, UPDATABLE))
    _validate(request, fields)
    policy.require_visible(principal, project_id, "project", project_id)
    if "enabled" in fields and not policy.is_cloud_admin(principal):
        raise errors.PermissionDenied(
            "only a cloud-admin may enable or disable a project", reason="nubis.policy.denied"
        )

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.project(project_id), identity_pb2.Project)
        if current is None:
            raise errors.NotFound(f"project {project_id} not found", metadata={"id": project_id})
        _check_revision(request.meta.revision, current.mod_revision)
        project = identity_pb2.Project()
        project.CopyFrom(current.value)
        if "name" in fields and request.meta.name != project.meta.name:
            await _rename(txn, project, request.meta.name)
        _apply(project, request, fields)
        if not project.enabled and current.value.enabled:
            await revocation.revoke_subject(store, txn, "project", project_id,
                                            token_ttl=token_ttl)
        txn.put(keys.project(project_id), project)

    await store.atomic(body)
    return await get(store, principal, project_id)


def _check_revision(expected: int, actual: int) -> None:
    if expected and expected != actual:
        raise errors.Conflict(
            "the record changed since it was read", reason="nubis.conflict",
            metadata={"expected_revision": str(expected), "revision": str(actual)},
        )


async def _rename(txn: Txn, project: identity_pb2.Project, new_name: str) -> None:
    if await txn.get(keys.project_name(new_name), identity_pb2.NameIndex):
        raise errors.AlreadyExists(
            f"project name {new_name!r} is taken",
            reason="nubis.identity.name_taken", metadata={"name": new_name},
        )
    txn.delete(keys.project_name(project.meta.name))
    txn.create(keys.project_name(new_name), identity_pb2.NameIndex(id=project.meta.id))


def _apply(project: identity_pb2.Project, request: identity_pb2.Project,
           fields: tuple[str, ...]) -> None:
    if "name" in fields:
        project.meta.name = request.meta.name
    if "description" in fields:
        project.meta.description = request.meta.description
    if "labels" in fields:
        project.meta.labels.clear()
        project.meta.labels.update(request.meta.labels)
    if "enabled" in fields:
        project.enabled = request.enabled
    project.state = _state(project.enabled)
    project.meta.update_time.CopyFrom(resources.now())
    project.meta.revision = 0


async def delete(
    store: Store, project_id: str, revision: int, *, token_ttl: int
) -> None:
    """Remove an empty project with its roles and quota; its tokens are revoked."""
    resources.check_id(project_id)
    assignments, _ = await store.list_all(
        keys.role_prefix(project_id), identity_pb2.RoleAssignment
    )

    async def body(txn: Txn) -> None:
        current = await txn.get(keys.project(project_id), identity_pb2.Project)
        if current is None:
            raise errors.NotFound(f"project {project_id} not found", metadata={"id": project_id})
        _check_revision(revision, current.mod_revision)
        usage_keys = [keys.legacy_usage_key(project_id),
                      *(key for _, key in keys.usage_keys(project_id))]
        usage = dict(zip(usage_keys, await txn.get_many(
            [(key, identity_pb2.Usage) for key in usage_keys]), strict=True))
        if any(v > 0 for found in usage.values() if found is not None
               for v in found.value.in_use.values()):
            raise errors.FailedPrecondition(
                f"project {project_id} still owns resources",
                reason="nubis.identity.project_in_use", metadata={"id": project_id},
            )
        txn.delete(keys.project(project_id))
        txn.delete(keys.project_name(current.value.meta.name))
        for assignment in assignments:
            txn.delete(assignment.key)
        if await txn.get(keys.quota_key(project_id), identity_pb2.Quota):
            txn.delete(keys.quota_key(project_id))
        for key, found in usage.items():
            if found is not None:
                txn.delete(key)
        await revocation.revoke_subject(store, txn, "project", project_id, token_ttl=token_ttl)

    await store.atomic(body)
    await role.sweep(store, keys.role_prefix(project_id), lambda _: True)
