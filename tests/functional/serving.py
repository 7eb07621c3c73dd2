"""Waiting for a service process started by a test to report SERVING."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable

import pytest

from services.client.lab import health


async def wait_serving(address: str, proc: subprocess.Popen[bytes], log_text: Callable[[], str],
                       within: float = 30.0) -> None:
    """Return once `address` reports SERVING; fail with the log if `proc` exits or time runs out."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"service exited with {proc.returncode}:\n{log_text()}")
        if await health.grpc_health(address, probe_seconds=1.0) == "SERVING":
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"service not SERVING after {within}s:\n{log_text()}")
