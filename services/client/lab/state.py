"""`<state-dir>/lab.json`: the record of every process a lab started, and whether each still runs.

A PID alone is not an identity (PIDs are reused), so each record also keeps
the kernel start time of the process and its command line; a live PID counts
as ours only if /proc still shows the same start time and the same program.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.client.lab import daemons

STATE_FILE = "lab.json"
_FORMAT_VERSION = 1


@dataclass
class ProcessRecord:
    """One started process, as `down` and `status` need it."""

    name: str
    pid: int
    argv: list[str]
    readiness: str
    wave: int
    log: str
    port: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    start_time: float = 0.0
    start_ticks: int = 0
    health_path: str = "/health"

    def is_running(self) -> bool:
        """True if the PID is alive and still the very process this record describes."""
        if not daemons.pid_alive(self.pid):
            return False
        ticks = process_start_ticks(self.pid)
        if ticks is None or ticks != self.start_ticks:
            return False
        return _same_program(self.pid, self.argv)


@dataclass
class LabState:
    """The content of lab.json."""

    state_dir: str
    host: str
    created: float
    processes: list[ProcessRecord] = field(default_factory=list)
    version: int = _FORMAT_VERSION
    nodes: int | None = None
    """How many agents the lab was started with (None: recorded before this was kept)."""
    base_port: int | None = None
    """The --base-port of the lab's ports (None: the default ports)."""
    tls: bool = False
    """Started with --tls: its services speak mutual TLS only, its Redis wants a password."""
    driver: str = "test"
    """The agents' libvirt driver: 'test' or 'qemu' (a lab-private libvirtd)."""

    def endpoints(self) -> dict[str, str]:
        """name -> host:port of every component that listens."""
        return {p.name: f"{self.host}:{p.port}" for p in self.processes if p.port is not None}

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["endpoints"] = self.endpoints()
        return data


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def load(state_dir: Path) -> LabState | None:
    """The recorded lab in `state_dir`, or None if there is none (or it is unreadable)."""
    path = state_path(state_dir)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # A torn or hand-edited file must not wedge the lab: treat it as absent.
        return None
    if not isinstance(raw, dict) or raw.get("version") != _FORMAT_VERSION:
        return None
    try:
        processes = [ProcessRecord(**p) for p in raw.get("processes", [])]
        return LabState(state_dir=raw["state_dir"], host=raw["host"], created=raw["created"],
                        processes=processes, nodes=raw.get("nodes"),
                        base_port=raw.get("base_port"), tls=bool(raw.get("tls", False)),
                        driver=str(raw.get("driver", "test")))
    except (KeyError, TypeError):
        return None


def save(state: LabState, state_dir: Path) -> None:
    """Write lab.json atomically, so a crash mid-write never leaves half a record."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(state_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def remove(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(state_dir).unlink()


def record(name: str, daemon: daemons.Daemon, *, readiness: str, wave: int,
           port: int | None, ports: dict[str, int], health_path: str = "/health") -> ProcessRecord:
    """The record of a process just spawned."""
    return ProcessRecord(
        name=name, pid=daemon.pid, argv=[str(a) for a in daemon.proc.args],  # type: ignore[union-attr]
        readiness=readiness, wave=wave, log=str(daemon.log_path), port=port, ports=ports,
        start_time=time.time(), start_ticks=process_start_ticks(daemon.pid) or 0,
        health_path=health_path,
    )


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: when the process started, in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; split after it.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def _same_program(pid: int, argv: list[str]) -> bool:
    """True if the process runs `argv`: same command line, or the same executable.

    Some daemons (redis-server) rewrite their command line, so the executable
    behind /proc/<pid>/exe is accepted as proof as well.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # Arguments are NUL-terminated; empty arguments ("--save", "") are kept.
    cmdline = raw[:-1].split(b"\0") if raw.endswith(b"\0") else raw.split(b"\0")
    if [part.decode(errors="replace") for part in cmdline] == argv:
        return True
    with contextlib.suppress(OSError):
        exe = os.path.realpath(f"/proc/{pid}/exe")
        return exe in {os.path.realpath(argv[0]), _exec_target(argv)}
    return False


def _exec_target(argv: list[str]) -> str:
    """The program a wrapper ending in a shell's `exec PROGRAM ...` becomes (the lab's
    libvirtd is started through ip netns exec, unshare and sh), or ''."""
    if not argv or " exec " not in f" {argv[-1]}":
        return ""
    program = f" {argv[-1]}".rsplit(" exec ", 1)[1].split()[:1]
    found = shutil.which(program[0]) if program else None
    return os.path.realpath(found) if found else ""
