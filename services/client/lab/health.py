"""Readiness probes of lab components: gRPC health (grpc.health.v1) or a plain TCP connect."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import channel
from services.client.lab import daemons
from services.common.settings import TlsSettings

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNREACHABLE = "unreachable"
LISTENING = "listening"

# One probe must never stall `up` or `status`: a healthy server answers in ms.
PROBE_TIMEOUT = 1.0


async def grpc_health(address: str, probe_seconds: float = PROBE_TIMEOUT,
                      tls: TlsSettings | None = None) -> str:
    """The overall serving status of the server at `address`, or "unreachable"."""
    chan = channel.make_channel(address, settings=tls)
    try:
        # The generated stub's methods are set in __init__, invisible to its type stubs.
        stub: Any = health_pb2_grpc.HealthStub(chan)
        request = health_pb2.HealthCheckRequest(service="")
        response = await stub.Check(request, timeout=probe_seconds)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    except grpc.aio.AioRpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return UNREACHABLE
        return exc.code().name
    finally:
        await chan.close()


def http_health(url: str, probe_seconds: float = PROBE_TIMEOUT) -> str:
    """SERVING if GET `url` answers 200, NOT_SERVING on another status, else "unreachable"."""
    try:
        with urllib.request.urlopen(url, timeout=probe_seconds) as response:
            return SERVING if response.status == 200 else NOT_SERVING
    except urllib.error.HTTPError:
        return NOT_SERVING
    except (OSError, ValueError):
        return UNREACHABLE


def tcp_health(host: str, port: int) -> str:
    """"listening" if something accepts connections on host:port, else "unreachable"."""
    return LISTENING if daemons.port_open(host, port) else UNREACHABLE
