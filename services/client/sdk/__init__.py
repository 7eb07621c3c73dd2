"""The nubis SDK: a typed asyncio client of every nubis service.

    import asyncio
    import nubis

    async def main() -> None:
        async with nubis.connect() as cloud:          # the lab, or --cloud NAME's settings
            servers = await cloud.compute.ListInstances(ListInstancesRequest())
            ...
            await cloud.wait_for_instance(server_id, "ACTIVE")

    asyncio.run(main())

`connect` finds identity and the caller's token as the `nubis` CLI does
(services.client.sdk.cloud); each service's RPCs are methods of `cloud.identity`,
`cloud.compute`, `cloud.storage`, `cloud.network` and `cloud.scheduler`, taking
and returning the generated messages (nubis.<service>.v1), each with its
deadline and retries on UNAVAILABLE where a repeat is safe. A failed call
raises the services.common.errors class of its status (`errors.NotFound`, ...),
with `code`, `reason`, `message`, `metadata` and, for `errors.InvalidArgument`,
`violations` (field, description). `nubis.connect` is this module's `connect`.
"""

from __future__ import annotations

from services.client.sdk.cloud import Cloud, connect
from services.client.sdk.waiters import ResourceFailed, WaitTimeout
from services.common import errors

__all__ = ["Cloud", "ResourceFailed", "WaitTimeout", "connect", "errors"]
