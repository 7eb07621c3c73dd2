"""The lab's reaper: the orphans of the command it runs are its own and are reaped at once;
the signals that stop a lab reach the command, whose status it exits with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.client.lab import reaper

# Leaves an orphan (a grandchild sleeping 1 s) and says its pid, then lives 4 s more.
_ORPHANING = """
import os, sys, time
if os.fork() == 0:
    grandchild = os.fork()
    if grandchild == 0:
        time.sleep(1)
        os._exit(0)
    print(grandchild, flush=True)
    os._exit(0)
time.sleep(4)
"""


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_an_orphan_of_the_command_is_the_reapers_and_is_reaped_when_it_ends() -> None:
    proc = subprocess.Popen(reaper.argv([sys.executable, "-c", _ORPHANING]),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        orphan = int(proc.stdout.readline())
        give_up = time.monotonic() + 2.0
        while _ppid(orphan) != proc.pid:  # once its parent (the command's child) has ended
            assert time.monotonic() < give_up, "the orphan did not fall to the reaper"
            time.sleep(0.005)
        give_up = time.monotonic() + 3.0
        while Path(f"/proc/{orphan}").exists():  # a zombie keeps its /proc entry
            assert time.monotonic() < give_up, "the orphan was not reaped"
            time.sleep(0.02)
        assert proc.poll() is None  # the command itself still runs
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_reaches_the_command_and_its_status_is_the_reapers() -> None:
    proc = subprocess.Popen(reaper.argv(["sleep", "30"]))
    try:
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_command_that_cannot_run_exits_127_and_none_is_a_usage_error() -> None:
    assert subprocess.run(reaper.argv(["/nonexistent/nubis-command"]),
                          capture_output=True, check=False).returncode == 127
    assert subprocess.run(reaper.argv([]), capture_output=True, check=False).returncode == 2
