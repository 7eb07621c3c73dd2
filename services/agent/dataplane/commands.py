"""Running the dataplane's programs (`ip`, `bridge`, `nft`, `sysctl`, dnsmasq) as root.

Every failure is FailedPrecondition ``nubis.agent.dataplane_failed`` naming the
command (and what it was fed on stdin) and what it printed on stderr.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from services.common import errors

COMMAND_TIMEOUT = 15.0
"""Seconds one command may take."""
FAILED = "nubis.agent.dataplane_failed"


def run(argv: Sequence[str], stdin: str | None = None, *, missing_ok: bool = False) -> str:
    """`argv`'s standard output; `missing_ok`: "" where it failed for want of its object
    ("No such file or directory", as `nft list` says of a table that is not there)."""
    command = list(argv)
    try:
        done = subprocess.run(command, capture_output=True, text=True, input=stdin,
                              timeout=COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise failed(command, str(exc)) from exc
    if done.returncode != 0:
        if missing_ok and "No such file or directory" in done.stderr:
            return ""
        shown = command if stdin is None else [*command, "<<", stdin.replace("\n", "; ")]
        raise failed(shown, done.stderr.strip() or f"exit status {done.returncode}")
    return done.stdout


def failed(command: Sequence[str], why: str) -> errors.FailedPrecondition:
    """The error of a command that failed: the whole of it in the message, its program in
    the metadata (for `ip`, with its object and verb: "ip netns exec <ns>", "ip link add")."""
    program = command[0] if command[0] != "ip" else " ".join(command[:4])
    return errors.FailedPrecondition(f"`{' '.join(command)}` failed: {why}", reason=FAILED,
                                     metadata={"command": program})
