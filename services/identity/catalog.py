"""The service catalog as clients see it: live endpoints that services registered."""

from __future__ import annotations

import re

from nubis.identity.v1 import identity_pb2

from services.common import catalog, errors
from services.common.store import Store

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


async def list_endpoints(store: Store, name: str) -> list[identity_pb2.Endpoint]:
    """Endpoints whose leases are alive (expired ones vanished with their lease)."""
    if name and not _NAME.fullmatch(name):
        raise errors.InvalidArgument(
            "invalid service name",
            violations=[errors.FieldViolation("name", "lowercase letters, digits and -")],
        )
    prefix = catalog.endpoint_prefix(name) if name else catalog.CATALOG_PREFIX
    items, _ = await store.list_all(prefix, identity_pb2.Endpoint)
    return [item.value for item in items]
