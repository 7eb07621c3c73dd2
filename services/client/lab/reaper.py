"""Run a daemon under a child subreaper, so the processes it orphans are reaped as they exit.

libvirtd daemonizes every QEMU it starts: the guest's process is re-parented
to the nearest subreaper, else to PID 1. On a machine without systemd, PID 1
may be a container's init that reaps late (a second or more) or never; a
guest killed by libvirt then stays a zombie that libvirt sees alive, and
every destroy waits out libvirt's polls until the zombie goes. Under this
process the orphans are ours and are reaped the moment they exit.

``python -m services.client.lab.reaper COMMAND [ARG...]`` runs COMMAND,
forwards SIGTERM, SIGINT and SIGHUP to it, reaps every orphan that lands
here, and exits with COMMAND's status once it has ended (orphans still
running then fall to PID 1, as they would without this process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import types

_PR_SET_CHILD_SUBREAPER = 36
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def argv(command: list[str]) -> list[str]:
    """`command` run under the reaper (the same Python as the caller's)."""
    return [sys.executable, "-m", __name__, *command]


def main(command: list[str]) -> int:
    if not command:
        print("usage: python -m services.client.lab.reaper COMMAND [ARG...]", file=sys.stderr)
        return 2
    _become_subreaper()
    child = os.fork()
    if child == 0:
        _exec(command)

    def forward(signum: int, _frame: types.FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    while True:
        pid, status = os.wait()  # every orphan that ends here, until the command itself
        if pid == child:
            return os.waitstatus_to_exitcode(status)


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        reason = os.strerror(ctypes.get_errno())
        print(f"reaper: cannot become a subreaper ({reason}); orphans fall to PID 1",
              file=sys.stderr)


def _exec(command: list[str]) -> None:
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"reaper: cannot run {command[0]}: {exc}", file=sys.stderr)
    os._exit(127)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.exit(128 - code if code < 0 else code)
