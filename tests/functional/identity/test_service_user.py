"""`nubis-manage bootstrap` makes the service user from the lab's config, once; services log in.

The lab's config names a generated password file (mode 0600); bootstrap, run
as the real command with that config, creates the service user with the
cloud-wide `service` role, finds it on a second run, and gives it a changed
password; the service clients built from the same config then log in with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from nubis.identity.v1 import identity_pb2

from services.client import peers
from services.client.lab import config, runner
from services.common import errors
from services.common.settings import load_settings
from services.common.store import Store
from services.identity import main
from tests.conftest import EtcdEndpoint
from tests.functional.authz.world import ADMIN_PASSWORD, service_settings, start_service


async def _bootstrap(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.identity.manage", "bootstrap", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode() + err.decode()


async def test_bootstrap_makes_the_service_user_once_and_services_log_in(
    store: Store, etcd: EtcdEndpoint, tmp_path: Path,
) -> None:
    plan = runner.make_plan(tmp_path / "lab", base_port=27500)
    config.write_config(plan)
    password_file = plan.state_dir / config.SERVICE_PASSWORD_FILE
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert password not in plan.config_file.read_text()
    # The lab's environment, pointed at this test's etcd prefix, with cheap hashing.
    env = {**config.child_environment(plan), "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd.endpoint]),
           "NUBIS_ETCD__PREFIX": store.root, "NUBIS_AUTH__ADMIN_PASSWORD": ADMIN_PASSWORD,
           "NUBIS_AUTH__HASH_TIME_COST": "1", "NUBIS_AUTH__HASH_MEMORY_KIB": "8192"}

    first, second = await _bootstrap(env), await _bootstrap(env)

    assert "service user nubis-service" in first and first.rstrip().endswith("created")
    assert second.rstrip().endswith("already present")
    assert password not in first + second
    settings = service_settings(etcd.endpoint, store.root, tmp_path / "unused.pem")
    settings.auth.signing_key_file = None
    identity = await start_service(main.build, store, settings, settings.identity)
    lab_settings = load_settings(config_file=str(plan.config_file))
    client_settings = dataclasses.replace(peers.ClientSettings.from_settings(lab_settings),
                                          identity_address=identity.running.address)
    admin = peers.ServiceClients(dataclasses.replace(
        client_settings, credential=peers.ServiceCredential("admin", ADMIN_PASSWORD, "admin")))
    service = peers.ServiceClients(client_settings)
    try:
        assert client_settings.credential == peers.ServiceCredential(
            "nubis-service", password, "service")
        login = await _login(service, password)
        assert list(login.roles) == ["service"]
        held = await admin.identity.ListRoleAssignments(identity_pb2.ListRoleAssignmentsRequest(
            user_id=login.user_id, all_projects=True))
        assert [(a.project_id, a.role) for a in held.assignments] == [("", "service")]
        users = await admin.identity.ListUsers(identity_pb2.ListUsersRequest(all_projects=True))
        assert [u.meta.name for u in users.users].count("nubis-service") == 1

        # A changed password in the config: bootstrap gives it to the user.
        password_file.write_text("a-new-service-password\n")
        assert (await _bootstrap(env)).rstrip().endswith("password updated")
        with pytest.raises(errors.Unauthenticated):
            await _login(service, password)
        assert list((await _login(service, "a-new-service-password")).roles) == ["service"]
    finally:
        await admin.close()
        await service.close()
        await identity.stop()


async def _login(clients: peers.ServiceClients, password: str
                 ) -> identity_pb2.AuthenticateResponse:
    return await clients.identity.Authenticate(identity_pb2.AuthenticateRequest(
        username="nubis-service", password=password, project="service"))


def test_the_lab_keeps_the_service_password_across_config_rewrites(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    plan = runner.make_plan(tmp_path / "lab", base_port=27500)
    config.write_config(plan)
    password = (plan.state_dir / config.SERVICE_PASSWORD_FILE).read_text()
    config.write_config(plan)
    assert (plan.state_dir / config.SERVICE_PASSWORD_FILE).read_text() == password
    # A password in the caller's shell never reaches the lab's services.
    monkeypatch.setenv("NUBIS_SERVICE_AUTH__PASSWORD", "from-the-shell")
    assert "NUBIS_SERVICE_AUTH__PASSWORD" not in config.child_environment(plan)
    assert os.environ["NUBIS_SERVICE_AUTH__PASSWORD"] == "from-the-shell"
