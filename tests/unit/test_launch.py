"""services.launch: a service process runs its main without rich; the lab starts services so."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services import launch
from services.client.lab import components

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import sys
from services import launch
launch.keep_out_unused()
import services.compute.main, services.common.logging
from services.common.settings import Settings
import structlog
services.common.logging.configure_logging(Settings())
try:
    raise ValueError("boom")
except ValueError:
    structlog.get_logger("probe").exception("failed")
print(sorted(name for name in sys.modules if name.split(".")[0] in ("rich", "pygments", "celery")
             and sys.modules[name] is not None))
"""


def test_a_service_process_imports_neither_rich_nor_celery_and_logs_plain_tracebacks() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
    # structlog's plain traceback, not a rich box.
    assert "Traceback (most recent call last):" in done.stderr
    assert "ValueError: boom" in done.stderr


def test_an_unknown_service_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "services.launch", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "unknown service 'nope'" in done.stderr


def test_the_lab_starts_every_service_through_the_launcher(tmp_path: Path) -> None:
    plan = components.LabPlan(state_dir=tmp_path, ports=components.LabPorts.from_base(20000),
                              nodes=2, config_file=tmp_path / "nubis.toml")
    started = [spec for spec in components.components(plan) if spec.name.startswith("nubis-")]
    assert started
    for spec in started:
        assert spec.argv[1:3] == ["-m", "services.launch"]
        assert spec.argv[3] in launch.SERVICES


_CRYPTO_PROBE = """
import sys
import services.compute.main, services.storage.main, services.network.main
import services.scheduler.main
print(sorted(name for name in sys.modules if name.startswith(("cryptography.hazmat", "jwt"))))
"""


def test_services_other_than_identity_start_without_cryptography() -> None:
    # Token checks go through services.common.ed25519 and compute reads key pairs with
    # cryptography only when it handles one: each process is some 13 MiB smaller so.
    # (redis-py imports the bare `cryptography` package, which is small, to see it is there.)
    done = subprocess.run([sys.executable, "-c", _CRYPTO_PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
