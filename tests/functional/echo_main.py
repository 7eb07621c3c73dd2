"""A service process serving the test-only EchoService through `run_service`.

Run as ``python -m tests.functional.echo_main --port P --metrics-port M`` with
the usual ``NUBIS_*`` environment (etcd endpoints, prefix, shutdown grace);
tests send it SIGTERM and read its log lines.
"""

from __future__ import annotations

import argparse
import asyncio

from services.common import server
from services.common.settings import ServiceEndpoint, Settings, load_settings
from services.common.store import Store
from tests.functional import echo_service


async def build(store: Store, settings: Settings) -> server.ServiceParts:
    # Touch etcd once, so a process that starts has proven its store works.
    await store.revision()
    return server.ServiceParts(
        registrations=[echo_service.registration()],
        authenticator=echo_service.AnyBearerAuthenticator(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, default=None)
    args = parser.parse_args()
    settings = load_settings()
    endpoint = ServiceEndpoint(host="127.0.0.1", port=args.port, metrics_port=args.metrics_port)
    asyncio.run(server.run_service("echo", build, settings, endpoint))


if __name__ == "__main__":
    main()
