"""Prometheus scrape configs: the shipped one names every service's default metrics port, and
the one `nubis lab up` writes names the lab's own ports, agents included."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.client.lab import components, config, runner
from services.common.settings import DEFAULT_PORTS

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "prometheus.yml"


def _targets(document: dict[str, object]) -> dict[str, list[str]]:
    jobs = document["scrape_configs"]
    assert isinstance(jobs, list)
    return {job["job_name"]: [target for static in job.get("static_configs", [])
                              for target in static["targets"]] for job in jobs}


def test_shipped_config_scrapes_every_service_at_its_default_metrics_port() -> None:
    targets = _targets(yaml.safe_load(SHIPPED.read_text()))
    for service, port in DEFAULT_PORTS.items():
        assert targets[f"nubis-{service}"] == [f"127.0.0.1:{port + 100}"]
    assert "nubis-agent" in targets


def test_lab_writes_a_config_with_its_own_ports(tmp_path: Path) -> None:
    plan = runner.make_plan(tmp_path, nodes=2, base_port=20000)
    config.write_config(plan)
    written = yaml.safe_load((plan.state_dir / "prometheus.yml").read_text())
    targets = _targets(written)
    for service, ports in plan.ports.services.items():
        assert targets[f"nubis-{service}"] == [f"127.0.0.1:{ports.metrics_port}"]
    assert targets["nubis-agent"] == ["127.0.0.1:20110", "127.0.0.1:20111"]
    agents = {spec.name: spec for spec in components.components(plan)
              if spec.name.startswith("nubis-agent-")}
    if agents:  # the agents' environment gives them the ports the config scrapes
        assert agents["nubis-agent-2"].env["NUBIS_AGENT__METRICS_PORT"] == "20111"
    labels = [static["labels"]["node"] for job in written["scrape_configs"]
              if job["job_name"] == "nubis-agent" for static in job["static_configs"]]
    assert labels == ["node-1", "node-2"]
