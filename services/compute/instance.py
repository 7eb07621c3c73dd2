"""Instance records: fetch, visibility, what callers see, the create transaction, get/list/update.

An instance is written BUILDING by `create`, in one transaction with the
quota it takes (instances, vcpus, ram_mb), its BUILD operation, its "create"
action and its request_id record; the build then runs in the background
(services.compute.build). A retried create with the same request_id returns
the instance the first one wrote. Other projects' instances are NOT_FOUND.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from nubis.compute.v1 import (
    compute_service_pb2,
    instance_pb2,
    instance_requests_pb2,
    operation_pb2,
)

from services.common import errors, filtering, pages, policy, quota, requests, resources
from services.common.context import Principal
from services.common.store import Store, Txn, Versioned
from services.compute import keys

if TYPE_CHECKING:  # the runner records the operation; it imports this module
    from services.compute import operation

Instance = instance_pb2.Instance
State = instance_pb2.Instance.State
TaskState = instance_pb2.Instance.TaskState
CREATE = resources.method(compute_service_pb2.DESCRIPTOR, "ComputeService", "CreateInstance")
# Seconds a create may keep losing compares (many boots of one project share its usage record).
CREATE_PATIENCE = 30.0
UPDATABLE = ("name", "description", "labels", "hostname", "guest_metadata")

_KEYS: filtering.Keys = {
    "name": None, "flavor_id": None, "image_id": None, "availability_zone": None,
    "state": frozenset(filtering.enum_names(Instance.State.DESCRIPTOR)),
    "power_state": frozenset(filtering.enum_names(Instance.PowerState.DESCRIPTOR)),
    "task_state": frozenset(filtering.enum_names(Instance.TaskState.DESCRIPTOR)),
}
_ADMIN_KEYS: filtering.Keys = {**_KEYS, "node": None, "project_id": None}


def domain_name(instance_id: str) -> str:
    """The libvirt domain of an instance."""
    return f"instance-{instance_id}"


def not_found(instance_id: str) -> errors.NotFound:
    return errors.NotFound(f"instance {instance_id} not found", metadata={"id": instance_id})


def sees_everything(principal: Principal | None) -> bool:
    """Cloud-admins and other nubis services see every project's instances and their nodes."""
    return principal is None or policy.is_cloud_admin(principal) or policy.is_service(principal)


async def fetch(store: Store, instance_id: str) -> Versioned[Instance]:
    resources.check_id(instance_id)
    found = await store.find(keys.instance(instance_id), Instance)
    if found is None:
        raise not_found(instance_id)
    return found


async def visible(store: Store, principal: Principal | None,
                  instance_id: str) -> Versioned[Instance]:
    """The instance, NOT_FOUND when it belongs to a project the caller may not see."""
    found = await fetch(store, instance_id)
    if not sees_everything(principal):
        assert principal is not None
        if found.value.meta.project_id != principal.project_id:
            raise not_found(instance_id)
    return found


async def in_txn(txn: Txn, instance_id: str) -> Versioned[Instance]:
    found = await txn.get(keys.instance(instance_id), Instance)
    if found is None:
        raise not_found(instance_id)
    return found


def put(txn: Txn, record: Instance) -> None:
    record.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.instance(record.meta.id), record)


def shown(record: Instance, principal: Principal | None,
          revision: int = 0) -> Instance:
    """The caller's copy: node and domain name for operators and services only; never user_data."""
    copy = Instance()
    copy.CopyFrom(record)
    copy.ClearField("user_data")
    if revision:
        copy.meta.revision = revision
    if not sees_everything(principal):
        copy.node = ""
        copy.domain_name = ""
    return copy


def shown_versioned(found: Versioned[Instance], principal: Principal | None) -> Instance:
    return shown(found.value, principal, found.mod_revision)


def usage(record: Instance) -> dict[str, int]:
    """The quota an instance holds while it exists.

    While a move awaits its outcome (`migration.old_flavor` set: resizing,
    VERIFY_RESIZE) it holds the larger of the old and new sizes, as a
    resize reserves the growth when it starts and gives it back on revert.
    """
    vcpus, ram_mb = record.flavor.vcpus, record.flavor.ram_mb
    if record.migration.HasField("old_flavor"):
        vcpus = max(vcpus, record.migration.old_flavor.vcpus)
        ram_mb = max(ram_mb, record.migration.old_flavor.ram_mb)
    return {"instances": 1, "vcpus": vcpus, "ram_mb": ram_mb}


class _DryRun(Exception):
    """validate_only: everything checked, the transaction must not commit."""


async def replayed_in(txn: Txn, idempotency: requests.Idempotency | None) -> Instance | None:
    """Inside the create transaction: what an identical earlier request made, else None.

    NOT_FOUND when it made an instance since deleted (the request is done);
    ALREADY_EXISTS (`requests.REUSED`) when the request_id served another request.
    """
    earlier = await requests.replayed(txn, idempotency)
    if not earlier:
        return None
    found = await txn.get(keys.instance(earlier), Instance)
    if found is None:
        raise not_found(earlier)
    return found.value


async def start_in(txn: Txn, runner: operation.Runner, principal: Principal,
                   request: instance_requests_pb2.CreateInstanceRequest, record: Instance,
                   idempotency: requests.Idempotency | None) -> operation.Started:
    """Inside the create transaction, its quota reserved: a copy of `record` written
    BUILDING with its operation, action and request_id record."""
    fresh = Instance()
    fresh.CopyFrom(record)
    started = await runner.record(txn, fresh, operation_pb2.Operation.BUILD,
                                  action_name="create", principal=principal,
                                  request_id=request.request_id)
    await requests.remember(txn, idempotency, fresh.meta.id)
    return started


async def create(runner: operation.Runner, principal: Principal,
                 request: instance_requests_pb2.CreateInstanceRequest,
                 record: Instance) -> Instance:
    """Write `record` (admitted: references checked, flavor copied) BUILDING and start its build.

    One transaction: request_id replay check, quota, instance, operation,
    action, request_id record. `validate_only` runs the quota check and writes
    nothing. (CreateInstance itself goes through `instance_batch`, which writes
    the creates of a project that arrive together in one such transaction.)
    """
    project_id = record.meta.project_id
    idempotency = requests.prepare(runner.store, project_id, CREATE, request,
                                   request.request_id, validate_only=request.validate_only)

    async def body(txn: Txn) -> tuple[Instance, operation.Operation | None]:
        earlier = await replayed_in(txn, idempotency)
        if earlier is not None:
            return earlier, None
        await quota.reserve(txn, project_id, usage(record))
        if request.validate_only:
            raise _DryRun
        started = await start_in(txn, runner, principal, request, record, idempotency)
        return started.instance, started.op

    deadline = asyncio.get_running_loop().time() + CREATE_PATIENCE
    try:
        async with runner.turn(project_id):
            written, op = await runner.store.atomic(body, deadline=deadline)
    except _DryRun:
        return shown(record, principal)
    if op is not None:
        runner.start(op)
    return shown(written, principal)


def _fields(record: Instance) -> dict[str, str]:
    return {
        "name": record.meta.name, "flavor_id": record.flavor_id, "image_id": record.image_id,
        "availability_zone": record.availability_zone, "node": record.node,
        "project_id": record.meta.project_id, "state": State.Name(record.state),
        "power_state": Instance.PowerState.Name(record.power_state),
        "task_state": TaskState.Name(record.task_state),
    }


def matcher(project_id: str | None, text: str, *,
            admin: bool) -> Callable[[Versioned[Instance]], bool]:
    """Which instances a List or Watch with this scope and filter passes."""
    wanted = filtering.parse(text, _ADMIN_KEYS if admin else _KEYS)

    def keep(item: Versioned[Instance]) -> bool:
        record = item.value
        if project_id is not None and record.meta.project_id != project_id:
            return False
        return wanted.matches(_fields(record), record.meta.labels)

    return keep


async def list_instances(store: Store, principal: Principal | None,
                         request: instance_requests_pb2.ListInstancesRequest,
                         ) -> tuple[list[Instance], str]:
    scope = (None if principal is None
             else policy.list_scope(principal, all_projects=request.all_projects))
    keep = matcher(scope, request.filter, admin=sees_everything(principal))
    page, token = await pages.filtered_page(
        store, keys.INSTANCES, Instance, keep,
        size=pages.page_size(request.page_size), page_token=request.page_token)
    return [shown_versioned(item, principal) for item in page], token


def _apply_update(record: Instance, change: Instance, paths: list[str]) -> None:
    violations = errors.ViolationCollector()
    for path in paths:
        if path == "name":
            resources.check_name(violations, "instance.meta.name", change.meta.name)
            record.meta.name = change.meta.name
        elif path == "description":
            record.meta.description = change.meta.description
        elif path == "labels":
            resources.check_labels(violations, "instance.meta.labels", dict(change.meta.labels))
            record.meta.labels.clear()
            record.meta.labels.update(change.meta.labels)
        elif path == "hostname":
            record.hostname = change.hostname
        else:
            record.guest_metadata.clear()
            record.guest_metadata.update(change.guest_metadata)
    violations.check("invalid instance update")


async def update(store: Store, principal: Principal | None,
                 request: instance_requests_pb2.UpdateInstanceRequest) -> Instance:
    change = request.instance
    paths = resources.check_mask(request.update_mask.paths, UPDATABLE)
    await visible(store, principal, change.meta.id)

    async def body(txn: Txn) -> Versioned[Instance]:
        found = await in_txn(txn, change.meta.id)
        if change.meta.revision and change.meta.revision != found.mod_revision:
            raise errors.Conflict(f"instance {change.meta.id} changed since revision "
                                  f"{change.meta.revision}", metadata={"id": change.meta.id})
        record = found.value
        _apply_update(record, change, paths)
        put(txn, record)
        return found

    await store.atomic(body)
    return shown_versioned(await fetch(store, change.meta.id), principal)

