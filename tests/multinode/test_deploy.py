"""The multi-node deploy files: units start real entry points, role configs load as their role.

Each systemd unit under deploy/systemd runs a console script pyproject.toml
declares and reads /etc/nubis/nubis.toml; each role's config under
deploy/config loads through the settings every process uses and says what
its role needs (the controller's address for etcd, Redis and identity; a
node's own tunnel address; routers on the network node only).
"""

from __future__ import annotations

import configparser
import tomllib
from pathlib import Path

import pytest

from services.common.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = ("identity", "scheduler", "compute", "network", "storage", "agent")


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / f"nubis-{name}.service")
    return parser


def _role(name: str) -> Settings:
    return load_settings(str(DEPLOY / "config" / f"{name}.toml"))


@pytest.mark.parametrize("name", UNITS)
def test_each_unit_runs_its_console_script_with_the_role_config(name: str) -> None:
    scripts = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["scripts"]
    service = _unit(name)["Service"]
    assert service["ExecStart"].split()[0].rsplit("/", 1)[1] in scripts
    assert service["ExecStart"] == f"/opt/nubis/bin/nubis-{name}"
    assert service["Environment"] == "NUBIS_CONFIG=/etc/nubis/nubis.toml"
    # Only the agent needs root (the kernel dataplane makes devices and namespaces).
    assert service["User"] == ("root" if name == "agent" else "nubis")


def test_nodes_reach_the_controller_at_the_address_it_publishes() -> None:
    controller = _role("controller")
    address = controller.identity.advertise_host
    for service in ("identity", "compute", "storage", "network", "scheduler"):
        endpoint = getattr(controller, service)
        assert endpoint.host == "0.0.0.0" and endpoint.advertise_host == address
    for role in ("compute-node", "network-node"):
        node = _role(role)
        assert node.etcd.endpoints == controller.etcd.endpoints == [f"{address}:2379"]
        assert node.redis_url == controller.redis_url
        assert node.identity.advertised_address() == f"{address}:7500"
        assert node.service_auth.password_file == controller.service_auth.password_file


def test_each_node_has_its_own_tunnel_address_and_only_the_network_node_hosts_routers() -> None:
    compute, network = _role("compute-node"), _role("network-node")
    assert compute.agent.tunnel_address != network.agent.tunnel_address
    assert "127.0.0.1" not in (compute.agent.tunnel_address, network.agent.tunnel_address)
    assert (compute.agent.network_node, network.agent.network_node) == (False, True)
