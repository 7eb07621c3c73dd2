"""The lab's Prometheus scrape config: prometheus.yml in the state dir, at the lab's own ports.

One job per control service (its metrics port) and one for the agents (each
node's metrics port, labelled with its node name); `prometheus
--config.file=<state dir>/prometheus.yml` then scrapes the whole lab.
Rewritten on every `nubis lab up`, like nubis.toml.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from services.client.lab import components
from services.client.lab.components import LabPlan

PROMETHEUS_FILE = "prometheus.yml"


def scrape_config(plan: LabPlan) -> dict[str, object]:
    """The lab's scrape config as the mapping prometheus.yml holds."""
    host = plan.ports.host
    jobs: list[dict[str, object]] = [
        {"job_name": f"nubis-{name}",
         "static_configs": [{"targets": [f"{host}:{service.metrics_port}"]}]}
        for name, service in plan.ports.services.items()
    ]
    if plan.nodes:
        jobs.append({"job_name": "nubis-agent", "static_configs": [
            {"targets": [f"{host}:{components.agent_metrics_port(plan, index)}"],
             "labels": {"node": components.node_name(index)}}
            for index in range(1, plan.nodes + 1)
        ]})
    return {"global": {"scrape_interval": "15s"}, "scrape_configs": jobs}


def write(plan: LabPlan) -> Path:
    """Write the lab's prometheus.yml into its state dir; its path."""
    path = plan.state_dir / PROMETHEUS_FILE
    path.write_text("# Written by `nubis lab up`; rewritten on every start.\n"
                    + yaml.safe_dump(scrape_config(plan), sort_keys=False))
    return path
