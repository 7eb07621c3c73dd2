"""Compute tasks: the node's domains (spawn and the lifecycle come with the compute service)."""

from __future__ import annotations

from typing import Any

from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import phases
from services.common import errors, tasks


class DomainStatus(phases.AgentTask[tasks_pb2.DomainStatusRequest, tasks_pb2.DomainStatus]):
    """One domain's power state, for the compute service's power-state sync."""

    spec = tasks.DOMAIN_STATUS

    def __init__(self, driver: driver_module.Driver) -> None:
        self._domains = driver.domains

    def check_arguments(self, request: tasks_pb2.DomainStatusRequest) -> None:
        if not request.name:
            raise errors.InvalidArgument(
                "a domain name is required",
                violations=[errors.FieldViolation("name", "must not be empty")],
            )

    def execute(self, request: tasks_pb2.DomainStatusRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        domain = self._domains.status(request.name)
        return tasks_pb2.DomainStatus(name=domain.name, uuid=domain.uuid, state=domain.state)


def all_tasks(driver: driver_module.Driver) -> list[phases.AgentTask[Any, Any]]:
    return [DomainStatus(driver)]
