"""Router tasks: a namespace per router with its legs, default route and NAT table.

ensure_router carries the router's whole desired state (legs, gateway,
floating IPs, routes), so a redelivered or repeated task converges to the
same node state; ensure and remove lock the router id. router_state reads
the routers back, for tests and operators.
"""

from __future__ import annotations

from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import router_plan, routers
from services.agent.tasks import phases
from services.common import errors, network_devices, tasks


class EnsureRouter(
    phases.AgentTask[tasks_pb2.EnsureRouterRequest, tasks_pb2.EnsureRouterResponse]
):
    """Make the node carry the router: namespace, legs, routes, forwarding and NAT."""

    spec = tasks.ENSURE_ROUTER

    def __init__(self, node_routers: routers.Routers) -> None:
        self._routers = node_routers

    def check_arguments(self, request: tasks_pb2.EnsureRouterRequest) -> None:
        router_plan.check(request)

    def lock_key(self, request: tasks_pb2.EnsureRouterRequest) -> str:
        return _lock_key(request.router_id)

    def execute(self, request: tasks_pb2.EnsureRouterRequest,
                ctx: phases.Context) -> tasks_pb2.EnsureRouterResponse:
        changed = self._routers.ensure_router(request)
        state = self._routers.router_state(request.router_id)
        return tasks_pb2.EnsureRouterResponse(
            router_id=request.router_id, namespace=state.namespace if state else "",
            nft_table=state.nft_table if state else "", dataplane=self._routers.kind,
            changed=changed,
        )


class RemoveRouter(
    phases.AgentTask[tasks_pb2.RemoveRouterRequest, tasks_pb2.RemoveRouterResponse]
):
    """Remove the router's namespace with its legs and NAT table; nothing there is done."""

    spec = tasks.REMOVE_ROUTER

    def __init__(self, node_routers: routers.Routers) -> None:
        self._routers = node_routers

    def check_arguments(self, request: tasks_pb2.RemoveRouterRequest) -> None:
        _check_router_id(request.router_id)

    def lock_key(self, request: tasks_pb2.RemoveRouterRequest) -> str:
        return _lock_key(request.router_id)

    def check_prerequisites(self, request: tasks_pb2.RemoveRouterRequest,
                            ctx: phases.Context) -> tasks_pb2.RemoveRouterResponse | None:
        if self._routers.router_state(request.router_id) is None:
            return tasks_pb2.RemoveRouterResponse(router_id=request.router_id, changed=False,
                                                  dataplane=self._routers.kind)
        return None

    def execute(self, request: tasks_pb2.RemoveRouterRequest,
                ctx: phases.Context) -> tasks_pb2.RemoveRouterResponse:
        changed = self._routers.remove_router(request.router_id)
        return tasks_pb2.RemoveRouterResponse(router_id=request.router_id, changed=changed,
                                              dataplane=self._routers.kind)


class RouterState(
    phases.AgentTask[tasks_pb2.RouterStateRequest, tasks_pb2.RouterStateResponse]
):
    """What the node holds for one router, or for every router it carries."""

    spec = tasks.ROUTER_STATE

    def __init__(self, node_routers: routers.Routers) -> None:
        self._routers = node_routers

    def check_arguments(self, request: tasks_pb2.RouterStateRequest) -> None:
        if request.router_id:
            _check_router_id(request.router_id)

    def execute(self, request: tasks_pb2.RouterStateRequest,
                ctx: phases.Context) -> tasks_pb2.RouterStateResponse:
        ids = [request.router_id] if request.router_id else self._routers.router_ids()
        response = tasks_pb2.RouterStateResponse(dataplane=self._routers.kind)
        for router_id in ids:
            state = self._routers.router_state(router_id)
            if state is not None:
                response.routers.append(state)
        return response


def _check_router_id(router_id: str) -> None:
    try:
        network_devices.short_id(router_id)
    except ValueError as exc:
        raise errors.InvalidArgument(
            "router_id must be a router's UUID",
            violations=[errors.FieldViolation("router_id", str(exc))]) from exc


def _lock_key(router_id: str) -> str:
    return f"router/{router_id}"


def all_tasks(node_routers: routers.Routers) -> list[phases.AgentTask[Any, Any]]:
    return [EnsureRouter(node_routers), RemoveRouter(node_routers), RouterState(node_routers)]
