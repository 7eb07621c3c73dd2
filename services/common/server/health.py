"""grpc.health.v1 for a nubis server: every registered service and "" report one state.

SERVING once the server has started; NOT_SERVING while the service cannot
reach etcd (and SERVING again once it can); NOT_SERVING for good as soon as
it starts draining, so load balancers and `grpc_health_probe` stop sending
new calls while the in-flight ones finish.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """The health service of one server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self._names: tuple[str, ...] = (health.OVERALL_HEALTH,)

    async def serving(self, service_names: Iterable[str]) -> None:
        """Report "" (the whole server) and each named service SERVING."""
        self._names = (health.OVERALL_HEALTH, *service_names)
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING (ignored once draining)."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self._names:
            await self._servicer.set(name, status)

    async def draining(self) -> None:
        """Report every service NOT_SERVING from now on (later sets are ignored)."""
        await self._servicer.enter_graceful_shutdown()
