"""Deleting an instance: from any state, restartable, releasing everything it holds."""

from __future__ import annotations

from nubis.compute.v1 import instance_pb2, instance_requests_pb2

from services.common.context import Principal
from services.compute import operation


async def delete(runner: operation.Runner, principal: Principal,
                 request: instance_requests_pb2.DeleteInstanceRequest) -> instance_pb2.Instance:
    """Move the instance to DELETING and tear it down in the background."""
    raise NotImplementedError("DeleteInstance")
