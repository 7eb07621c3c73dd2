"""The SDK example of README.md, run as written (a subprocess of its own) against a real lab."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.lab_cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The one python block of the README's "Python SDK" section."""
    text = README.read_text()
    section = text[text.index("## Python SDK"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the SDK section holds one python example"
    return str(blocks[0])


def test_the_readme_sdk_example_runs_as_written(lab_dir: Path, base_port: int,
                                               tmp_path: Path) -> None:
    up = run_cli("lab", "up", "--state-dir", str(lab_dir), "--base-port", str(base_port),
                 "--nodes", "2", "--driver", "test", timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {key: value for key, value in os.environ.items() if not key.startswith("NUBIS_")}
    env["NUBIS_LAB_DIR"] = str(lab_dir)
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=200, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    name, node, addresses = lines[0].split(" ", 2)
    assert name == "sdk-demo" and node.startswith(("lab-node", "node")), lines[0]
    assert re.fullmatch(r"\['10\.0\.0\.\d+'\]", addresses), lines[0]
    assert lines[1] == "NOT_FOUND nubis.not_found", lines[1]
    # The example deleted its server: nothing of it is left.
    listed = run_cli("-o", "json", "server", "list", env={"NUBIS_LAB_DIR": str(lab_dir)})
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == []
