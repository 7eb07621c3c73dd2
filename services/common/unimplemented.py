"""Serve an API that is defined but not built yet: token-checked, in the catalog, UNIMPLEMENTED.

Compute, storage and network start this way until their servicers exist, so a
lab already runs every process, answers health, and rejects bad tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc.aio
from google.protobuf import descriptor

from services.common import auth, catalog, policy, server
from services.common.settings import Settings
from services.common.store import Store


async def service_parts(
    store: Store,
    settings: Settings,
    *,
    name: str,
    service: descriptor.ServiceDescriptor,
    servicer: object,
    add_to_server: Callable[[Any, grpc.aio.Server], None],
) -> server.ServiceParts:
    """Parts of a service whose generated base `servicer` answers every RPC UNIMPLEMENTED.

    Any valid token may call (there is nothing to protect yet); the service
    registers the address it actually bound in the catalog.
    """
    verifier, stop_verifier = await auth.start_verifier(
        store, resync_interval=settings.auth.revocation_resync
    )
    table = {f"/{service.full_name}/{method.name}": policy.authenticated()
             for method in service.methods}
    return server.ServiceParts(
        registrations=[server.Registration(service.full_name, servicer, add_to_server)],
        authenticator=auth.TokenAuthenticator(verifier, table),
        background=[
            *verifier.tasks,  # started above; a failed watch ends the service
            catalog.keep_server_registered(store, name, service.full_name,
                                           ttl=settings.catalog_ttl),
        ],
        on_stop=[stop_verifier],
    )
