"""Lab benchmark: how long `nubis lab up` takes and how much memory the running lab holds.

Runs the real CLI (`python -m services.client.cli lab up`, test driver, 2 nodes by
default) on a fresh state dir and free ports, after one untimed import of every
nubis entry module (a warm machine: the page cache holds the code). While `up`
runs, the bench reads lab.json as `up` writes it and probes every recorded part
itself (gRPC health for the services, etcd's /health, Redis's port, an agent's
worker reporting `ready.` in its log), so it prints when each part first served,
when each line of the bootstrap and seeding was printed, and when `up` returned.
Then it sums the resident memory (RSS, and PSS, which counts shared pages once) of
every process the lab started and of their children, process by process, and takes
the lab down with --purge. Goals: every part serving and `up` done in < 20 s,
the lab's RSS < 600 MiB.

``--compose`` times `docker-compose up -d` to every container healthy instead
(the image is built as tests/e2e/test_compose.py builds it); it is skipped with a
message when no Docker daemon answers. Usage:
``python bench/lab_bench.py [--nodes N] [--rounds R] [--compose]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.client.lab import health, runner, state
from services.client.lab.components import Readiness

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 20.0
GOAL_MIB = 600.0
UP_TIMEOUT = 180.0
ENTRY_MODULES = ("identity", "compute", "storage", "network", "scheduler", "agent")
AGENT_READY = "@"  # celery's "node.<name>@<host> ready." line names the worker
READY_WORD = " ready."


@dataclass
class Round:
    """What one `lab up` showed: when each part first served, each printed line, the end."""

    served: dict[str, float] = field(default_factory=dict)
    lines: list[tuple[float, str]] = field(default_factory=list)
    done: float = 0.0
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)
    """name -> (RSS KiB, PSS KiB), the process and its children."""

    @property
    def all_served(self) -> float:
        return max(self.served.values(), default=0.0)

    def rss_mib(self) -> float:
        return sum(rss for rss, _ in self.memory.values()) / 1024

    def pss_mib(self) -> float:
        return sum(pss for _, pss in self.memory.values()) / 1024


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "services.client.cli", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NUBIS_")}


def warm_up() -> None:
    """Import every entry module once, untimed, so the timed run finds the code cached."""
    for module in ENTRY_MODULES:
        subprocess.run([sys.executable, "-c", f"import services.{module}.main"], check=True,
                       cwd=REPO, timeout=120)
    subprocess.run(_cli("--help"), check=True, capture_output=True, cwd=REPO, timeout=60)


def _read_lines(stream: Iterator[str], began: float, into: list[tuple[float, str]]) -> None:
    for line in stream:
        if line.strip():
            into.append((time.monotonic() - began, line.rstrip()))


async def _probe(lab: state.LabState, record: state.ProcessRecord) -> bool:
    """True once `record`'s process serves: its health check, or its worker's `ready.`"""
    host = lab.host
    if record.readiness == Readiness.GRPC.value and record.port is not None:
        return await health.grpc_health(f"{host}:{record.port}") == health.SERVING
    if record.readiness == Readiness.HTTP.value and record.port is not None:
        url = f"http://{host}:{record.port}{record.health_path}"
        return await asyncio.to_thread(health.http_health, url) == health.SERVING
    if record.readiness == Readiness.TCP.value and record.port is not None:
        return health.tcp_health(host, record.port) == health.LISTENING
    return await asyncio.to_thread(_worker_ready, Path(record.log))


def _worker_ready(log: Path) -> bool:
    with contextlib.suppress(OSError):
        text = log.read_text(errors="replace")
        return any(AGENT_READY in line and READY_WORD in line for line in text.splitlines())
    return False


async def _watch(state_dir: Path, proc: subprocess.Popen[str], began: float,
                 result: Round) -> None:
    """Probe every part lab.json names until each served and `up` has returned."""
    while True:
        lab = state.load(state_dir)
        pending = [r for r in (lab.processes if lab else []) if r.name not in result.served]
        if lab is not None and pending:
            verdicts = await asyncio.gather(*(_probe(lab, r) for r in pending))
            for record, ok in zip(pending, verdicts, strict=True):
                if ok:
                    result.served[record.name] = time.monotonic() - began
        if proc.poll() is not None and not pending and lab is not None:
            return
        if proc.poll() is not None and (lab is None or proc.returncode != 0):
            return
        if time.monotonic() - began > UP_TIMEOUT:
            raise TimeoutError(f"the lab was not up after {UP_TIMEOUT:.0f}s")
        await asyncio.sleep(0.05)


def _sessions() -> dict[int, list[int]]:
    """Session id -> the PIDs in it (every lab process leads a session of its own)."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # Fields after the command name (which may hold spaces) follow its ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            found.setdefault(int(fields[3]), []).append(int(entry.name))
    return found


def _kib(pid: int, path: str, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def measure_memory(lab: state.LabState) -> dict[str, tuple[int, int]]:
    """RSS and PSS (KiB) of each recorded process together with its session's children."""
    sessions = _sessions()
    memory: dict[str, tuple[int, int]] = {}
    for record in lab.processes:
        pids = sessions.get(record.pid, [record.pid])
        memory[record.name] = (sum(_kib(p, "status", "VmRSS:") for p in pids),
                               sum(_kib(p, "smaps_rollup", "Pss:") for p in pids))
    return memory


def one_round(nodes: int) -> Round:
    """`lab up` on a fresh state dir, watched; memory measured; then `lab down --purge`."""
    with tempfile.TemporaryDirectory(prefix="nubis-lab-bench-") as scratch:
        state_dir = Path(scratch) / "lab"
        base = runner.find_free_base(start=24000, stop=32000, step=700)
        if base is None:
            raise SystemExit("no free block of ports for a lab")
        result = Round()
        began = time.monotonic()
        proc = subprocess.Popen(
            _cli("lab", "up", "--state-dir", str(state_dir), "--base-port", str(base),
                 "--nodes", str(nodes)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env())
        assert proc.stdout is not None
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, began, result.lines))
        reader.start()
        try:
            asyncio.run(_watch(state_dir, proc, began, result))
            proc.wait(timeout=UP_TIMEOUT)
            result.done = time.monotonic() - began
            reader.join()
            if proc.returncode != 0:
                raise SystemExit("lab up failed:\n" + "\n".join(t for _, t in result.lines))
            lab = state.load(state_dir)
            assert lab is not None
            time.sleep(2.0)  # let the last seeding calls' buffers settle before measuring
            result.memory = measure_memory(lab)
        finally:
            subprocess.run(_cli("lab", "down", "--state-dir", str(state_dir), "--purge",
                                "--grace", "5"), capture_output=True, cwd=REPO, env=_env(),
                           timeout=120, check=False)
            proc.kill()
        return result


def report(result: Round) -> None:
    print("  first served (s since `lab up` started):")
    for name, at in sorted(result.served.items(), key=lambda item: item[1]):
        print(f"    {at:6.2f}  {name}")
    print("  printed by up (bootstrap and seeding):")
    for at, text in result.lines:
        if not text.startswith(("┏", "┃", "┡", "│", "└", " ")) and "lab endpoints" not in text:
            print(f"    {at:6.2f}  {text[:90]}")
    print(f"  every part serving: {result.all_served:.2f}s; up returned: {result.done:.2f}s "
          f"(goal < {GOAL_SECONDS:.0f}s)")
    print("  memory (RSS / PSS MiB, with children):")
    for name, (rss, pss) in sorted(result.memory.items(), key=lambda item: -item[1][0]):
        print(f"    {rss / 1024:7.1f} / {pss / 1024:6.1f}  {name}")
    print(f"  lab total: RSS {result.rss_mib():.0f} MiB (goal < {GOAL_MIB:.0f}), "
          f"PSS {result.pss_mib():.0f} MiB")


def lab_bench(nodes: int, rounds: int) -> None:
    warm_up()
    results = []
    for index in range(rounds):
        print(f"round {index + 1}/{rounds}: nubis lab up --nodes {nodes} --driver test")
        results.append(one_round(nodes))
        report(results[-1])
    done = statistics.median(r.done for r in results)
    served = statistics.median(r.all_served for r in results)
    rss = statistics.median(r.rss_mib() for r in results)
    print(f"median of {rounds}: every part serving {served:.2f}s, up done {done:.2f}s, "
          f"RSS {rss:.0f} MiB")
    verdict = "met" if max(done, served) < GOAL_SECONDS and rss < GOAL_MIB else "NOT met"
    print(f"goals (< {GOAL_SECONDS:.0f} s, < {GOAL_MIB:.0f} MiB): {verdict}")


def compose_bench() -> None:
    """`docker-compose up -d` to every container healthy, when a Docker daemon answers."""
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=60, check=False).returncode != 0:
        print("compose: skipped, no Docker daemon answers (start dockerd, then run again)")
        return
    sys.path.insert(0, str(REPO))
    from tests.e2e import test_compose  # the image and project helpers of the compose test

    image = f"nubis:bench-{os.getpid()}"
    subprocess.run(["bash", str(REPO / "deploy" / "build-image.sh")], cwd=REPO, check=True,
                   env={**os.environ, "NUBIS_IMAGE": image}, capture_output=True, timeout=1200)
    compose = test_compose.Compose(image)
    try:
        began = time.monotonic()
        up = compose.run("up", "-d", "--no-build")
        if up.returncode != 0:
            raise SystemExit(up.stderr[-4000:])
        waited = test_compose._wait_healthy(compose)
        print(f"compose: up -d to every container healthy {time.monotonic() - began:.1f}s "
              f"(after up -d returned: {waited:.1f}s)")
        stats = subprocess.run(["docker", "stats", "--no-stream", "--format",
                                "{{.Name}} {{.MemUsage}}", *compose.run("ps", "-q").stdout.split()],
                               capture_output=True, text=True, check=False)
        print("compose: memory per container\n" + stats.stdout)
    finally:
        compose.run("down", "-v", "--remove-orphans", timeout=180)
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compose", action="store_true",
                        help="time docker-compose up to healthy instead of nubis lab up")
    args = parser.parse_args()
    if args.compose:
        compose_bench()
    else:
        lab_bench(args.nodes, args.rounds)


if __name__ == "__main__":
    main()
