"""`nubis-manage bootstrap`: idempotent first admin, credentials file the CLI can use."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import make_channel
from services.common import quota
from services.common.store import Store
from services.identity import main
from tests.conftest import EtcdEndpoint
from tests.functional.authz.world import service_settings, start_service


async def _manage(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.identity.manage", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_bootstrap_twice_then_use_the_credentials(
    store: Store, etcd: EtcdEndpoint, tmp_path: Path
) -> None:
    settings = service_settings(etcd.endpoint, store.root, tmp_path / "unused.pem")
    settings.auth.signing_key_file = None
    settings.auth.admin_password = None
    service = await start_service(main.build, store, settings, settings.identity)
    env = {**os.environ, "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd.endpoint]),
           "NUBIS_ETCD__PREFIX": store.root}
    env.pop("NUBIS_AUTH__ADMIN_PASSWORD", None)
    target = tmp_path / "lab" / "credentials.json"
    try:
        first = await _manage({**env, "NUBIS_QUOTA__DEFAULTS": '{"instances": 4}'}, "bootstrap",
                              "--write-credentials", str(target),
                              "--identity", service.running.address)
        second = await _manage({**env, "NUBIS_QUOTA__DEFAULTS": '{"instances": 9}'}, "bootstrap",
                               "--write-credentials", str(target),
                               "--identity", service.running.address)
        assert "created" in first and "already present" in second
        # The first bootstrap seeded the cloud's quota defaults; the second kept them.
        defaults = await store.get(quota.DEFAULTS_KEY, identity_pb2.Quota)
        assert dict(defaults.value.limits) == {"instances": 4}
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        credentials = json.loads(target.read_text())
        channel = make_channel(service.running.address, token=credentials["token"])
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        projects = await stub.ListProjects(identity_pb2.ListProjectsRequest(all_projects=True))
        await channel.close()
        assert [p.meta.name for p in projects.projects] == ["admin"]
    finally:
        await service.stop()
