"""Running the `nubis` CLI as a user would, and reading what a lab recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.client.lab import state

HEALTHY = {"SERVING", "listening", "running"}


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m services.client.cli ARGS` the way a user would."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("NUBIS_")}
    return subprocess.run(
        [sys.executable, "-m", "services.client.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**base_env, **(env or {})},
    )


def recorded_pids(lab_dir: Path) -> dict[str, int]:
    lab = state.load(lab_dir)
    assert lab is not None
    return {p.name: p.pid for p in lab.processes}


def status_rows(lab_dir: Path) -> list[dict[str, Any]]:
    result = run_cli("-o", "json", "lab", "status", "--state-dir", str(lab_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows
