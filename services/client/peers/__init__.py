"""Service-to-service calls: typed clients of the other nubis services, found in the catalog.

    clients = peers.ServiceClients(peers.ClientSettings.from_settings(settings))
    reply = await clients.scheduler.SelectDestinations(request)
    ...
    await clients.close()

Only identity's address is configured; the token comes from the service
credential and is renewed before it expires; every call has a deadline,
retries on UNAVAILABLE where that is safe, and raises the callee's error as
the services.common.errors class it was made from. See peers.rpc for how a
call is declared and peers.caller for how it runs.
"""

from __future__ import annotations

import random

from services.client.peers import caller, stubs
from services.client.peers.settings import ClientSettings, ServiceCredential
from services.client.peers.token import StaticToken, TokenSource

WARM_SECONDS = 60.0
"""Seconds a process at start keeps trying to log in and reach its peers ahead of its calls."""

__all__ = ["ClientSettings", "ServiceClients", "ServiceCredential", "StaticToken", "TokenSource"]


class ServiceClients:
    """The typed clients of one process, sharing its token, catalog cache and channels.

    The token is the credential's, renewed before it expires, unless `token`
    gives another source (the SDK's: a token from `nubis login` or NUBIS_TOKEN).
    Make it inside the event loop that uses it; `close` it on shutdown.
    """

    def __init__(self, settings: ClientSettings, *, rng: random.Random | None = None,
                 token: TokenSource | None = None) -> None:
        self.caller = caller.Caller(settings, rng=rng, token=token)
        self.identity = stubs.IdentityClient(self.caller)
        self.scheduler = stubs.SchedulerClient(self.caller)
        self.storage = stubs.StorageClient(self.caller)
        self.network = stubs.NetworkClient(self.caller)
        self.compute = stubs.ComputeClient(self.caller)

    async def warm(self, *services: str, within: float = WARM_SECONDS) -> None:
        """Log in and connect to `services` (catalog names) ahead of the first calls; never
        fails (what is not ready within `within` seconds is left to those calls). A service
        runs it beside its server at start, so its first requests pay for no login. A refused
        login is not asked again (identity's throttle counts it): the service user must exist
        before the processes that log in as it start, as `nubis lab up` and compose do."""
        await self.caller.warm(services, within=within)

    async def close(self) -> None:
        await self.caller.close()
