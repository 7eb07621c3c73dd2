"""Fixtures of the lab tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.client.lab import runner
from tests.e2e.lab_cli import run_cli


@pytest.fixture
def base_port() -> int:
    """A base port whose whole lab block (P..P+104) is free now.

    A random start keeps labs of tests running side by side apart; staying below
    the kernel's ephemeral range (32768..) keeps outgoing connections off our ports.
    """
    base = runner.find_free_base(start=random.randrange(10000, 30000, 100), stop=32500, step=700)
    assert base is not None, "no free block of ports for a lab"
    return base


@pytest.fixture
def lab_dir(tmp_path: Path) -> Iterator[Path]:
    """A lab state dir that is always taken down afterwards, even if the test failed."""
    path = tmp_path / "lab"
    yield path
    run_cli("lab", "down", "--state-dir", str(path), "--grace", "3")
