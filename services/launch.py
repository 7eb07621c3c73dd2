"""The entry points of nubis's service processes: `nubis-<service>` and `python -m services.launch`.

`python -m services.launch compute` (or `nubis-compute`) runs `services.compute.main`
like `python -m services.compute.main` does, after keeping out of the process what
no service uses: structlog imports rich (and pygments through it) whenever rich is
installed, only to offer rich console tracebacks, and the CLI installs rich. nubis
logs plain tracebacks (services.common.logging), so a service process would carry
some 3 MiB of rich for nothing. Importing a service's main module directly, as tests
and benches do, still works; it only costs that memory. The CLI keeps rich.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

SERVICES = ("identity", "compute", "storage", "network", "scheduler", "agent")

# Never imported by a service process: a name bound to None here makes `import rich`
# raise ImportError, which is how structlog learns rich is "not installed".
_UNUSED_IN_SERVICES = ("rich",)


def keep_out_unused() -> None:
    """Make the libraries of `_UNUSED_IN_SERVICES` unimportable in this process.

    Only for a process that runs one service and nothing else; one that already
    imported such a library keeps it.
    """
    for name in _UNUSED_IN_SERVICES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def run(service: str, argv: list[str]) -> None:
    """Run `service`'s main with `argv` (the agent's options; the API services take none)."""
    if service not in SERVICES:
        raise SystemExit(f"unknown service {service!r}; one of: {', '.join(SERVICES)}")
    keep_out_unused()
    main: Callable[..., None] = importlib.import_module(f"services.{service}.main").main
    sys.argv = [f"nubis-{service}", *argv]
    main()


def identity() -> None:
    run("identity", sys.argv[1:])


def compute() -> None:
    run("compute", sys.argv[1:])


def storage() -> None:
    run("storage", sys.argv[1:])


def network() -> None:
    run("network", sys.argv[1:])


def scheduler() -> None:
    run("scheduler", sys.argv[1:])


def agent() -> None:
    run("agent", sys.argv[1:])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -m services.launch SERVICE [OPTIONS]; "
                         f"SERVICE one of: {', '.join(SERVICES)}")
    run(sys.argv[1], sys.argv[2:])
