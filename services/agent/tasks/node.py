"""Tasks about the node itself: the liveness probe, what libvirt reports, and a timed delay."""

from __future__ import annotations

import time
from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import phases
from services.common import errors, tasks

MAX_DELAY_SECONDS = 30.0


class Ping(phases.AgentTask[tasks_pb2.PingRequest, tasks_pb2.PingResponse]):
    """Proves a worker consumes this node's queue."""

    spec = tasks.PING

    def execute(self, request: tasks_pb2.PingRequest,
                ctx: phases.Context) -> tasks_pb2.PingResponse:
        return tasks_pb2.PingResponse(node=ctx.node, status="pong")


class NodeInfo(phases.AgentTask[tasks_pb2.NodeInfoRequest, tasks_pb2.NodeInfoResponse]):
    """Capacity and domains of the node, read from libvirt now."""

    spec = tasks.NODE_INFO

    def __init__(self, driver: driver_module.Driver) -> None:
        self._driver = driver

    def execute(self, request: tasks_pb2.NodeInfoRequest,
                ctx: phases.Context) -> tasks_pb2.NodeInfoResponse:
        facts = self._driver.facts()
        return tasks_pb2.NodeInfoResponse(
            node=ctx.node, vcpus=facts.vcpus, memory_mb=facts.memory_mb,
            disk_gb=facts.disk_gb, hypervisor_type=facts.hypervisor_type,
            domains=self._driver.domain_names(),
        )


class Delay(phases.AgentTask[tasks_pb2.DelayRequest, tasks_pb2.DelayResponse]):
    """Holds a worker thread for the asked time (Ganeti's TestDelay): tests deadlines."""

    spec = tasks.DELAY

    def check_arguments(self, request: tasks_pb2.DelayRequest) -> None:
        if not 0 <= request.seconds <= MAX_DELAY_SECONDS:
            raise errors.InvalidArgument(
                f"delay must be 0 to {MAX_DELAY_SECONDS:g} seconds, not {request.seconds:g}",
                violations=[errors.FieldViolation("seconds", "must be 0 to 30")],
            )

    def execute(self, request: tasks_pb2.DelayRequest,
                ctx: phases.Context) -> tasks_pb2.DelayResponse:
        started = time.monotonic()
        time.sleep(request.seconds)
        return tasks_pb2.DelayResponse(node=ctx.node, waited_seconds=time.monotonic() - started)


def all_tasks(driver: driver_module.Driver) -> list[phases.AgentTask[Any, Any]]:
    return [Ping(), NodeInfo(driver), Delay()]
