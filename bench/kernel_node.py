"""What the kernel dataplane benchmarks share: a throwaway node namespace and their timings.

`node_namespace` makes a network namespace standing for a node and a state
directory for its dataplane; at the end (whatever happened) it kills what
runs in the node and in the namespaces the dataplane named after it
(`<node>.…`: DHCP and routers), deletes those, then the node.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def node_namespace(prefix: str) -> Iterator[tuple[str, str]]:
    """Yields the node namespace's name and a state directory, both gone at the end."""
    node = f"nbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", node], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as state:
            os.chmod(state, 0o755)
            yield node, state
    finally:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        names = [line.split()[0] for line in listed.stdout.splitlines() if line.split()]
        for name in [n for n in names if n.startswith(f"{node}.")] + [node]:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in pids.stdout.split():
                subprocess.run(["kill", "-9", pid], check=False)
            subprocess.run(["ip", "netns", "del", name], check=False)


def timed(action: Callable[..., object], *args: object) -> float:
    """Milliseconds `action(*args)` took."""
    started = time.perf_counter()
    action(*args)
    return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> dict[str, float]:
    """Median and p95 of millisecond samples."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": round(statistics.median(ordered), 1), "p95_ms": round(p95, 1)}
