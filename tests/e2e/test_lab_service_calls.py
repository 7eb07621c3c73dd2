"""A lab's services can call each other: the lab hands out the service credential.

After `nubis lab up`, a client built from nothing but the lab's config file
(identity's address and the generated password file) logs in as the service
user and reaches the scheduler through identity's catalog.
"""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

from nubis.scheduler.v1 import scheduler_pb2

from services.client import peers
from services.client.lab import config
from services.common.settings import load_settings
from tests.e2e.lab_cli import run_cli


def test_a_lab_service_reaches_the_scheduler_with_the_lab_credential(
    lab_dir: Path, base_port: int,
) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port))
    assert up.returncode == 0, up.stdout + up.stderr
    password_file = lab_dir / config.SERVICE_PASSWORD_FILE
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    assert password not in up.stdout + up.stderr
    for log in (lab_dir / "logs").iterdir():
        assert password not in log.read_text(errors="replace"), log.name

    settings = load_settings(config_file=str(lab_dir / config.CONFIG_FILE))
    nodes = asyncio.run(_list_nodes(peers.ClientSettings.from_settings(settings)))
    assert nodes, "the lab's agents registered no node"


async def _list_nodes(settings: peers.ClientSettings) -> list[str]:
    """The nodes the scheduler lists, waiting a while for the agents' first reports."""
    clients = peers.ServiceClients(settings)
    try:
        async with asyncio.timeout(30):
            while True:
                reply = await clients.scheduler.ListNodes(scheduler_pb2.ListNodesRequest())
                if reply.nodes:
                    return [node.name for node in reply.nodes]
                await asyncio.sleep(0.5)
    finally:
        await clients.close()
