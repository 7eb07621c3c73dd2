"""The layer contracts of .importlinter fail on the imports they forbid.

Each case copies the tree to a scratch directory, makes one forbidden change
there and runs lint-imports on the copy: exactly the contract that names that
rule must break. The untouched copy keeps every contract.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

ETCD = "Only the store talks to etcd"
IDENTITY = "Identity: entry points -> servicer -> domain -> keys"
SCHEDULER = "Scheduler: entry point -> servicer -> domain -> keys, validation"
STORAGE = "Storage: entry point -> servicer -> domain -> keys, validation"
NETWORK = "Network: entry point -> servicer -> domain -> keys, validation"
NEW_SERVICES = "Compute: entry point -> servicer -> domain -> keys, validation"


def _copy_tree(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("services", "gen"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy(ROOT / ".importlinter", target / ".importlinter")
    return target


def _lint(tree: Path) -> tuple[int, dict[str, str]]:
    """lint-imports' exit code on `tree` and each contract's outcome (KEPT or BROKEN)."""
    # The copy comes first on the path, ahead of the installed (editable) packages.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "gen")])}
    done = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    outcomes = dict(re.findall(r"^(.+?) (KEPT|BROKEN)\b", done.stdout, re.MULTILINE))
    assert outcomes, done.stdout + done.stderr
    return done.returncode, outcomes


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_untouched_tree_keeps_every_contract(tmp_path: Path) -> None:
    code, outcomes = _lint(_copy_tree(tmp_path))
    assert code == 0
    assert set(outcomes.values()) == {"KEPT"}
    assert {ETCD, IDENTITY, SCHEDULER, STORAGE, NETWORK, NEW_SERVICES} <= set(outcomes)


@pytest.mark.parametrize(("module", "line", "contract"), [
    # services.common is covered whole, the store's own modules excepted.
    ("services/common/quota.py", "import aetcd", ETCD),
    ("services/common/pages.py", "from aetcd import Client", ETCD),
    # A domain module or the keys module may not reach up to the servicer.
    ("services/identity/keys.py", "from services.identity import user", IDENTITY),
    ("services/identity/role.py", "from services.identity import servicer", IDENTITY),
    ("services/scheduler/validation.py", "from services.scheduler import placement", SCHEDULER),
    ("services/scheduler/nodes.py", "from services.scheduler import servicer", SCHEDULER),
    ("services/storage/keys.py", "from services.storage import volume", STORAGE),
    ("services/network/validation.py", "from services.network import servicer", NETWORK),
    # Compute's layers are exhaustive: a new module must be given its layer.
    ("services/compute/undeclared.py", '"""An undeclared domain module."""', NEW_SERVICES),
])
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = _copy_tree(tmp_path)
    target = tree / module
    if target.exists():
        _append(target, line)
    else:
        target.write_text(line + "\n")
    code, outcomes = _lint(tree)
    assert code != 0
    assert {name for name, outcome in outcomes.items() if outcome == "BROKEN"} == {contract}
