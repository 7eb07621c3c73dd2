"""A service process serving the test-only EchoService through `run_service`.

Run as ``python -m tests.functional.echo_main --port P [--fail-background-after S]`` with
the usual ``NUBIS_*`` environment (etcd endpoints, prefix, shutdown grace);
tests send it SIGTERM and read its log lines.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import structlog

from services.common import server
from services.common.settings import ServiceEndpoint, Settings, load_settings
from services.common.store import Store
from tests.functional import echo_service

Build = Callable[[Store, Settings], Awaitable[server.ServiceParts]]

_log = structlog.get_logger("tests.echo_main")


async def _finished_job() -> None:
    """A background job that is simply done: the service keeps serving."""


async def _failing_job(after: float) -> None:
    await asyncio.sleep(after)
    raise RuntimeError("background job crashed")


async def _say_stopped() -> None:
    _log.info("on_stop ran")


def builder(fail_background_after: float | None) -> Build:
    async def build(store: Store, settings: Settings) -> server.ServiceParts:
        # Touch etcd once, so a process that starts has proven its store works.
        await store.revision()
        background = [_finished_job()]
        if fail_background_after is not None:
            background.append(_failing_job(fail_background_after))
        return server.ServiceParts(
            registrations=[echo_service.registration()],
            authenticator=echo_service.AnyBearerAuthenticator(),
            background=background,
            on_stop=[_say_stopped],
        )

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--fail-background-after", type=float, default=None)
    args = parser.parse_args()
    settings = load_settings()
    endpoint = ServiceEndpoint(host="127.0.0.1", port=args.port, metrics_port=args.metrics_port)
    build = builder(args.fail_background_after)
    asyncio.run(server.run_service("echo", build, settings, endpoint))


if __name__ == "__main__":
    main()
