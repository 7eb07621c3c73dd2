"""The gRPC server bootstrap every nubis service runs on.

``from services.common import server``; then ``server.start(...)`` in tests, or
``server.run_service(...)`` as the body of a service's main.
"""

from services.common.server.bootstrap import (
    Registration,
    RunningServer,
    ServiceParts,
    run_service,
    start,
    start_background,
)
from services.common.server.interceptors import REQUEST_ID_KEY, Authenticator

__all__ = [
    "REQUEST_ID_KEY",
    "Authenticator",
    "Registration",
    "RunningServer",
    "ServiceParts",
    "run_service",
    "start",
    "start_background",
]
