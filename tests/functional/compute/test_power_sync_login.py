"""The power sync waits out a refused service login (a cloud whose bootstrap has not run yet)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from services.client import peers
from services.common.store import Store
from services.compute import power_sync
from services.identity import main
from tests.conftest import EtcdEndpoint
from tests.functional.authz.world import service_settings, start_service


async def test_a_refused_service_login_does_not_end_the_sync(
    store: Store, etcd: EtcdEndpoint, tmp_path: Path,
) -> None:
    settings = service_settings(etcd.endpoint, store.root, tmp_path / "unused.pem")
    settings.auth.signing_key_file = None
    identity = await start_service(main.build, store, settings, settings.identity)
    client_settings = dataclasses.replace(
        peers.ClientSettings.from_settings(settings),
        identity_address=identity.running.address,
        credential=peers.ServiceCredential("nubis-service", "not-made-yet", "service"))
    clients = peers.ServiceClients(client_settings)
    sync = power_sync.PowerSync(store, sender=None, clients=clients,  # type: ignore[arg-type]
                                interval=0.05)
    task = asyncio.create_task(sync.run_forever())
    try:
        await asyncio.sleep(1.0)  # several rounds, each refused at the login
        assert not task.done(), task.exception() if task.done() else None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await clients.close()
        await identity.stop()
