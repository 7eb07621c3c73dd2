"""Instance actions: the audit trail of every operation on an instance, with its steps.

An action is written RUNNING in the transaction that starts its operation
(`operation.Runner.record`), gains an event per step (`add_event`: the step
before it ends SUCCEEDED, the new one starts RUNNING) and ends SUCCEEDED or
FAILED in the transaction that records the outcome (`finish`). Actions live
at ``compute/actions/<instance id>/<action id>`` and outlive the instance's
record, so the actions of a deleted instance can still be read by an admin.
"""

from __future__ import annotations

from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_action_pb2, instance_pb2

from services.common import errors, filtering, pages, policy, resources
from services.common.context import Principal
from services.common.store import Store, Txn
from services.compute import keys

InstanceAction = instance_action_pb2.InstanceAction
Event = instance_action_pb2.InstanceActionEvent
State = instance_action_pb2.InstanceAction.State
Instance = instance_pb2.Instance

_FILTER_KEYS: filtering.Keys = {
    "action": None, "request_id": None,
    "state": frozenset(filtering.enum_names(InstanceAction.State.DESCRIPTOR)),
}


def new(found: Instance, name: str, principal: Principal | None,
        request_id: str = "") -> InstanceAction:
    """A RUNNING action `name` on `found`, requested by `principal`."""
    meta = resources.fresh_meta(resource_pb2.ResourceMeta(name=name), found.meta.project_id)
    return InstanceAction(
        meta=meta, state=State.RUNNING, instance_id=found.meta.id, action=name,
        request_id=request_id, user_id=principal.user_id if principal else found.user_id)


def put(txn: Txn, record: InstanceAction) -> None:
    record.meta.update_time.CopyFrom(resources.now())
    txn.put(keys.action(record.instance_id, record.meta.id), record)


def _close(event: Event, fault: resource_pb2.Fault | None) -> None:
    if event.state != State.RUNNING:
        return
    event.state = State.FAILED if fault is not None else State.SUCCEEDED
    event.finish_time.CopyFrom(resources.now())
    if fault is not None:
        event.fault.CopyFrom(fault)


async def add_event(txn: Txn, instance_id: str, action_id: str, name: str,
                    node: str = "") -> InstanceAction | None:
    """Inside a transaction: the step `name` starts (the running one before it succeeded).

    Returns the action as written (None: there is no such action)."""
    found = await txn.get(keys.action(instance_id, action_id), InstanceAction)
    if found is None:
        return None
    record = found.value
    for event in record.events:
        _close(event, None)
    record.events.append(Event(name=name, state=State.RUNNING, node=node,
                               start_time=resources.now()))
    put(txn, record)
    return record


async def finish(txn: Txn, instance_id: str, action_id: str,
                 fault: resource_pb2.Fault | None) -> None:
    """Inside a transaction: the action ends SUCCEEDED, or FAILED with `fault`'s message."""
    found = await txn.get(keys.action(instance_id, action_id), InstanceAction)
    if found is None:
        return
    record = found.value
    for event in record.events:
        _close(event, fault)
    record.state = State.FAILED if fault is not None else State.SUCCEEDED
    record.message = fault.message if fault is not None else "done"
    record.finish_time.CopyFrom(resources.now())
    put(txn, record)


def _shown(record: InstanceAction, principal: Principal | None) -> InstanceAction:
    """Nodes are shown to operators and services only."""
    if principal is None or policy.is_cloud_admin(principal) or policy.is_service(principal):
        return record
    copy = InstanceAction()
    copy.CopyFrom(record)
    for event in copy.events:
        event.node = ""
    return copy


def _order(record: InstanceAction) -> str:
    """Newest first: the inverted accept time, then the id (the page cursor)."""
    stamp = record.meta.create_time
    inverted = 10**20 - (stamp.seconds * 10**9 + stamp.nanos)
    return f"{inverted:020d}.{record.meta.id}"


async def list_actions(store: Store, principal: Principal | None, project_id: str,
                       request: instance_action_pb2.ListInstanceActionsRequest,
                       ) -> tuple[list[InstanceAction], str]:
    """One page of the instance's actions, newest first (the instance is visible)."""
    wanted = filtering.parse(request.filter, _FILTER_KEYS, labels=False)
    size = pages.page_size(request.page_size)
    found, _ = await store.list_all(keys.actions(request.instance_id), InstanceAction)
    records = [item.value for item in found if item.value.meta.project_id == project_id
               and wanted.matches({"action": item.value.action,
                                   "request_id": item.value.request_id,
                                   "state": State.Name(item.value.state)})]
    records.sort(key=_order)
    page, token = pages.page_of(records, _order, size=size, page_token=request.page_token,
                                listing=f"actions/{request.instance_id}",
                                well_formed=lambda cursor: "." in cursor)
    return [_shown(record, principal) for record in page], token


async def get_action(store: Store, principal: Principal | None, project_id: str,
                     request: instance_action_pb2.GetInstanceActionRequest) -> InstanceAction:
    resources.check_id(request.id)
    found = await store.find(keys.action(request.instance_id, request.id), InstanceAction)
    if found is None or found.value.meta.project_id != project_id:
        raise errors.NotFound(f"action {request.id} not found", metadata={"id": request.id})
    return _shown(found.value, principal)
