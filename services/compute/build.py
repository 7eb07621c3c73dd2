"""The BUILD operation: schedule, wire, make disks, spawn; reschedule; else ERROR with a fault."""

from __future__ import annotations

from services.compute import operation


def register(runner: operation.Runner) -> None:
    """Give `runner` the BUILD handler."""
