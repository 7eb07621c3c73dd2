"""The agent task contract: task names, payload messages, time limits and node queues.

Both the services that send tasks and `services.agent`, which runs them,
import this module; it is the one place the wire format of a task is written.
A task goes to the queue of its node (`queue_name`) with two keyword
arguments: `operation_id` (the operation it is part of, for logs and
idempotency) and `request` (the JSON form of its request message, proto
field names). The agent answers with an outcome, ``{"response": <response
JSON>}`` or ``{"error": <TaskError JSON>}``, so a domain error raised on the
node is raised again by the caller as the same class with the same reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, NewType, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from nubis.agent.v1 import tasks_pb2

from services.common import errors

OperationId = NewType("OperationId", str)
"""Names one operation (a boot, a pool check); every task of it carries the id."""

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

OPERATION_ID = "operation_id"
"""Keyword argument of every task holding its operation id."""
REQUEST = "request"
"""Keyword argument of every task holding its request message as JSON."""


@dataclass(frozen=True)
class TaskSpec(Generic[Req, Resp]):
    """One agent task: its name, messages and limits, as both sides must agree on them."""

    name: str
    """Celery task name (permanent once released)."""
    request_type: type[Req]
    """Message the task takes."""
    response_type: type[Resp]
    """Message the task answers."""
    time_limit: float
    """Seconds one run may take on the agent before its worker kills it."""
    soft_time_limit: float
    """Seconds after which the run is asked to stop (SoftTimeLimitExceeded)."""
    deadline: float
    """Seconds a caller waits for the outcome by default, time in the queue included."""
    retries: int = 3
    """Extra attempts the agent makes after a transient libvirt error (Unavailable)."""


PING = TaskSpec(
    "nubis.agent.ping", tasks_pb2.PingRequest, tasks_pb2.PingResponse,
    time_limit=10, soft_time_limit=5, deadline=15, retries=0,
)
NODE_INFO = TaskSpec(
    "nubis.agent.node_info", tasks_pb2.NodeInfoRequest, tasks_pb2.NodeInfoResponse,
    time_limit=30, soft_time_limit=20, deadline=40,
)
DELAY = TaskSpec(
    "nubis.agent.delay", tasks_pb2.DelayRequest, tasks_pb2.DelayResponse,
    time_limit=40, soft_time_limit=35, deadline=45, retries=0,
)
ENSURE_POOL = TaskSpec(
    "nubis.agent.storage.ensure_pool", tasks_pb2.EnsurePoolRequest, tasks_pb2.EnsurePoolResponse,
    time_limit=120, soft_time_limit=100, deadline=150,
)
LIST_NETWORKS = TaskSpec(
    "nubis.agent.network.list_networks", tasks_pb2.ListNetworksRequest,
    tasks_pb2.ListNetworksResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
DOMAIN_STATUS = TaskSpec(
    "nubis.agent.compute.domain_status", tasks_pb2.DomainStatusRequest, tasks_pb2.DomainStatus,
    time_limit=30, soft_time_limit=20, deadline=40,
)

# The node's L2 dataplane: a bridge, a VXLAN and a DHCP server per nubis network.
ENSURE_NETWORK = TaskSpec(
    "nubis.agent.network.ensure_network", tasks_pb2.EnsureNetworkRequest,
    tasks_pb2.EnsureNetworkResponse, time_limit=60, soft_time_limit=45, deadline=75,
)
REMOVE_NETWORK = TaskSpec(
    "nubis.agent.network.remove_network", tasks_pb2.RemoveNetworkRequest,
    tasks_pb2.RemoveNetworkResponse, time_limit=60, soft_time_limit=45, deadline=75,
)
NETWORK_STATE = TaskSpec(
    "nubis.agent.network.network_state", tasks_pb2.NetworkStateRequest,
    tasks_pb2.NetworkStateResponse, time_limit=30, soft_time_limit=20, deadline=40,
)

# The node's pool, image cache and volumes. Every limit stays under the agent's
# task_time_limit (600 s by default): the broker redelivers an unacked task after
# that plus a minute, and a task still running then would run twice at once.
# A fetch and a full copy move an image's bytes: the longest limits.
FETCH_IMAGE = TaskSpec(
    "nubis.agent.storage.fetch_image", tasks_pb2.FetchImageRequest,
    tasks_pb2.FetchImageResponse, time_limit=600, soft_time_limit=540, deadline=660,
)
ENSURE_VOLUME = TaskSpec(  # may fetch its backing image first
    "nubis.agent.storage.ensure_volume", tasks_pb2.EnsureVolumeRequest,
    tasks_pb2.EnsureVolumeResponse, time_limit=600, soft_time_limit=540, deadline=660,
)
SNAPSHOT_VOLUME = TaskSpec(
    "nubis.agent.storage.snapshot_volume", tasks_pb2.SnapshotVolumeRequest,
    tasks_pb2.SnapshotVolumeResponse, time_limit=600, soft_time_limit=540, deadline=660,
)
DELETE_VOLUME = TaskSpec(
    "nubis.agent.storage.delete_volume", tasks_pb2.DeleteVolumeRequest,
    tasks_pb2.DeleteVolumeResponse, time_limit=120, soft_time_limit=100, deadline=150,
)
RESIZE_VOLUME = TaskSpec(
    "nubis.agent.storage.resize_volume", tasks_pb2.ResizeVolumeRequest,
    tasks_pb2.ResizeVolumeResponse, time_limit=120, soft_time_limit=100, deadline=150,
)
VOLUME_INFO = TaskSpec(
    "nubis.agent.storage.volume_info", tasks_pb2.VolumeInfoRequest,
    tasks_pb2.VolumeInfoResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
POOL_INFO = TaskSpec(
    "nubis.agent.storage.pool_info", tasks_pb2.PoolInfoRequest,
    tasks_pb2.StoragePoolInfo, time_limit=30, soft_time_limit=20, deadline=40,
)

# The node's L3 dataplane (a namespace per router with its NAT table) and the
# security groups of its ports (libvirt nwfilters).
ENSURE_ROUTER = TaskSpec(
    "nubis.agent.network.ensure_router", tasks_pb2.EnsureRouterRequest,
    tasks_pb2.EnsureRouterResponse, time_limit=60, soft_time_limit=45, deadline=75,
)
REMOVE_ROUTER = TaskSpec(
    "nubis.agent.network.remove_router", tasks_pb2.RemoveRouterRequest,
    tasks_pb2.RemoveRouterResponse, time_limit=60, soft_time_limit=45, deadline=75,
)
ROUTER_STATE = TaskSpec(
    "nubis.agent.network.router_state", tasks_pb2.RouterStateRequest,
    tasks_pb2.RouterStateResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
ENSURE_PORT_FILTER = TaskSpec(
    "nubis.agent.network.ensure_port_filter", tasks_pb2.EnsurePortFilterRequest,
    tasks_pb2.PortFilter, time_limit=30, soft_time_limit=20, deadline=40,
)
ENSURE_GROUP_MEMBERS = TaskSpec(
    "nubis.agent.network.ensure_group_members", tasks_pb2.EnsureGroupMembersRequest,
    tasks_pb2.EnsureGroupMembersResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
REMOVE_PORT_FILTER = TaskSpec(
    "nubis.agent.network.remove_port_filter", tasks_pb2.RemovePortFilterRequest,
    tasks_pb2.RemovePortFilterResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
PORT_FILTER_STATE = TaskSpec(
    "nubis.agent.network.port_filter_state", tasks_pb2.PortFilterStateRequest,
    tasks_pb2.PortFilter, time_limit=30, soft_time_limit=20, deadline=40,
)

# The node's domains. A spawn may fetch kernel boot images into the cache first.
SPAWN = TaskSpec(
    "nubis.agent.compute.spawn", tasks_pb2.SpawnRequest, tasks_pb2.DomainStatus,
    time_limit=300, soft_time_limit=270, deadline=330,
)
POWER_ON = TaskSpec(
    "nubis.agent.compute.power_on", tasks_pb2.DomainRequest, tasks_pb2.DomainStatus,
    time_limit=60, soft_time_limit=45, deadline=75,
)
POWER_OFF = TaskSpec(  # waits up to the request's timeout_seconds for the guest
    "nubis.agent.compute.power_off", tasks_pb2.PowerOffRequest, tasks_pb2.DomainStatus,
    time_limit=360, soft_time_limit=330, deadline=390,
)
REBOOT = TaskSpec(
    "nubis.agent.compute.reboot", tasks_pb2.RebootRequest, tasks_pb2.DomainStatus,
    time_limit=360, soft_time_limit=330, deadline=390,
)
DESTROY = TaskSpec(
    "nubis.agent.compute.destroy", tasks_pb2.DestroyRequest, tasks_pb2.DestroyResponse,
    time_limit=120, soft_time_limit=100, deadline=150,
)
ATTACH_DEVICE = TaskSpec(
    "nubis.agent.compute.attach_device", tasks_pb2.DeviceRequest, tasks_pb2.DomainStatus,
    time_limit=60, soft_time_limit=45, deadline=75,
)
DETACH_DEVICE = TaskSpec(
    "nubis.agent.compute.detach_device", tasks_pb2.DeviceRequest, tasks_pb2.DomainStatus,
    time_limit=60, soft_time_limit=45, deadline=75,
)
CONSOLE_LOG = TaskSpec(
    "nubis.agent.compute.console_log", tasks_pb2.ConsoleLogRequest,
    tasks_pb2.ConsoleLogResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
LIST_DOMAINS = TaskSpec(
    "nubis.agent.compute.list_domains", tasks_pb2.ListDomainsRequest,
    tasks_pb2.ListDomainsResponse, time_limit=30, soft_time_limit=20, deadline=40,
)
MIGRATE = TaskSpec(
    "nubis.agent.compute.migrate", tasks_pb2.MigrateRequest, tasks_pb2.DomainStatus,
    time_limit=600, soft_time_limit=540, deadline=660, retries=0,
)

SPECS: Mapping[str, TaskSpec[Any, Any]] = {
    spec.name: spec
    for spec in (PING, NODE_INFO, DELAY, ENSURE_POOL, LIST_NETWORKS, DOMAIN_STATUS,
                 FETCH_IMAGE, ENSURE_VOLUME, SNAPSHOT_VOLUME, DELETE_VOLUME, RESIZE_VOLUME,
                 VOLUME_INFO, POOL_INFO,
                 ENSURE_NETWORK, REMOVE_NETWORK, NETWORK_STATE,
                 ENSURE_ROUTER, REMOVE_ROUTER, ROUTER_STATE,
                 ENSURE_PORT_FILTER, ENSURE_GROUP_MEMBERS, REMOVE_PORT_FILTER, PORT_FILTER_STATE,
                 SPAWN, POWER_ON, POWER_OFF, REBOOT, DESTROY, ATTACH_DEVICE, DETACH_DEVICE,
                 CONSOLE_LOG, LIST_DOMAINS, MIGRATE)
}
"""Every task an agent runs, by name."""

# The classes an error keeps across the trip, by the name the agent reports.
_ERROR_CLASSES: Mapping[str, type[errors.NubisError]] = {
    cls.__name__: cls
    for cls in (
        errors.NotFound, errors.AlreadyExists, errors.Conflict, errors.InvalidArgument,
        errors.FailedPrecondition, errors.ResourceExhausted, errors.PermissionDenied,
        errors.Unauthenticated, errors.Unavailable,
    )
}


def queue_name(node: str) -> str:
    """The Celery queue the agent of `node` consumes."""
    return f"node.{node}"


def new_operation_id() -> OperationId:
    return OperationId(str(uuid.uuid4()))


def to_json(message: Message) -> dict[str, Any]:
    """The JSON form of a request or response, as it travels."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(message_type: type[Req], payload: object, what: str) -> Req:
    """Parse a travelled message; InvalidArgument if it is not a `message_type`.

    Unknown fields are ignored, as in the binary form, so an agent one version
    behind still reads what a newer service sends.
    """
    message = message_type()
    if payload is None:
        return message
    try:
        if not isinstance(payload, dict):
            raise json_format.ParseError(f"expected a JSON object, not {type(payload).__name__}")
        json_format.ParseDict(payload, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise errors.InvalidArgument(
            f"{what} is not a {message_type.DESCRIPTOR.full_name}: {exc}",
            violations=[errors.FieldViolation(what, str(exc))],
        ) from exc
    return message


def response_outcome(response: Message) -> dict[str, Any]:
    """What the agent answers for a task that succeeded."""
    return {"response": to_json(response)}


def error_outcome(exc: errors.NubisError) -> dict[str, Any]:
    """What the agent answers for a task that raised a domain error."""
    # A subclass a service defines travels as the errors class it extends.
    kind = next((cls.__name__ for cls in type(exc).__mro__
                 if _ERROR_CLASSES.get(cls.__name__) is cls), "NubisError")
    error = tasks_pb2.TaskError(kind=kind, reason=exc.reason, message=exc.message,
                                metadata=exc.metadata)
    for violation in getattr(exc, "violations", ()):
        error.violations.add(field=violation.field, description=violation.description)
    return {"error": to_json(error)}


def outcome_response(spec: TaskSpec[Req, Resp], outcome: object, node: str) -> Resp:
    """The response of an outcome, or the domain error it carries raised again."""
    if isinstance(outcome, dict) and "error" in outcome:
        raise _domain_error(from_json(tasks_pb2.TaskError, outcome["error"], "error"), node)
    if not isinstance(outcome, dict) or "response" not in outcome:
        raise errors.NubisError(f"node {node} answered {spec.name} with no outcome",
                                reason="nubis.agent.bad_outcome", metadata={"node": node})
    return from_json(spec.response_type, outcome["response"], "response")


def _domain_error(error: tasks_pb2.TaskError, node: str) -> errors.NubisError:
    cls = _ERROR_CLASSES.get(error.kind, errors.NubisError)
    metadata = {"node": node, **error.metadata}
    reason = error.reason or None
    if cls is errors.InvalidArgument:
        violations = [errors.FieldViolation(v.field, v.description) for v in error.violations]
        return errors.InvalidArgument(error.message, violations=violations, reason=reason,
                                      metadata=metadata)
    return cls(error.message, reason=reason, metadata=metadata)
