"""Start and stop the third-party daemons nubis needs (etcd, Redis) from system binaries.

Used by `nubis lab up` and by the test fixtures, so both run the very same
processes. Every daemon is started in its own session so that it can be
stopped by PID without touching anything else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# Which Debian package provides each binary, for an actionable error message.
_PACKAGES = {"etcd": "etcd-server", "redis-server": "redis-server"}


class MissingBinary(RuntimeError):
    """A required system binary is not installed."""


def require_binary(name: str) -> str:
    """Return the path of `name` or raise MissingBinary naming the package to install."""
    # PATH alone decides (an unset PATH falls back to the OS default search path,
    # which covers /usr/bin): a caller can hide a binary by narrowing PATH.
    path = shutil.which(name)
    if path is None:
        package = _PACKAGES.get(name, name)
        raise MissingBinary(
            f"'{name}' was not found on PATH. Install it with: "
            f"sudo apt-get install -y {package}"
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports free on `host` right now.

    All are held open until the last is found: ports asked for one by one may
    come back twice, which two daemons of one cluster cannot share.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_open(host: str, port: int) -> bool:
    """True if something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
                  log_path: Path | None = None) -> None:
    """Wait until host:port accepts connections; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path else ""
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}:\n{tail}")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


@dataclass
class Daemon:
    """One started process, owned by whoever started it and stopped by its PID."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ports: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only this process's own group."""
        stop_pid(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)

    def kill(self) -> None:
        """SIGKILL at once (a crash, for failure tests)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop the process group led by `pid` (started with start_new_session)."""
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    """Stop several process groups at once: SIGTERM to all, SIGKILL to those left after `timeout`.

    Signalling them together means N processes take one grace period, not N.
    """
    remaining = list(pids)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in list(remaining):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                remaining.remove(pid)
            except PermissionError:
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while remaining and time.monotonic() < deadline:
            for pid in list(remaining):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                if not pid_alive(pid):
                    remaining.remove(pid)
            time.sleep(0.05)
        if not remaining:
            return


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Daemon:
    """Start argv in a new session with output to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=cwd,
        )
    return Daemon(name=name, proc=proc, log_path=log_path)


def etcd_argv(data_dir: Path, client_port: int, peer_port: int, *, name: str = "default",
              initial_cluster: str | None = None, host: str = "127.0.0.1") -> list[str]:
    """The command line of one etcd member with auto-compaction (DESIGN: always on).

    `initial_cluster` ("n1=http://127.0.0.1:p1,n2=...") makes it a member of a
    multi-member cluster; None makes a single-member cluster.
    """
    binary = require_binary("etcd")
    peer_url = f"http://{host}:{peer_port}"
    client_url = f"http://{host}:{client_port}"
    # Every member of one cluster must share the token, or they reject each other.
    token = (f"nubis-{zlib.crc32(initial_cluster.encode()):08x}" if initial_cluster
             else f"nubis-{name}-{peer_port}")
    return [
        binary, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster or f"{name}={peer_url}",
        "--initial-cluster-state", "new", "--initial-cluster-token", token,
        "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "5m",
        "--quota-backend-bytes", str(2 * 1024**3),
        "--log-level", "warn",
    ]


def start_etcd(data_dir: Path, client_port: int, peer_port: int, *, name: str = "default",
               initial_cluster: str | None = None, host: str = "127.0.0.1",
               log_path: Path | None = None, wait: bool = True) -> Daemon:
    """Start one etcd member (see `etcd_argv`)."""
    argv = etcd_argv(data_dir, client_port, peer_port, name=name,
                     initial_cluster=initial_cluster, host=host)
    data_dir.mkdir(parents=True, exist_ok=True)
    daemon = spawn(f"etcd-{name}", argv, log_path or data_dir.parent / f"etcd-{name}.log")
    daemon.ports = [client_port, peer_port]
    if wait:
        wait_for_port(host, client_port, 30, daemon.proc, daemon.log_path)
    return daemon


def redis_argv(data_dir: Path, port: int, *, host: str = "127.0.0.1",
               config_file: Path | None = None) -> list[str]:
    """The command line of a Redis server for Celery (no persistence: nothing in Redis is state).

    `config_file` (a redis.conf, e.g. with `requirepass`) is read before the flags.
    """
    binary = require_binary("redis-server")
    return [
        binary, *([str(config_file)] if config_file else []),
        "--port", str(port), "--bind", host, "--dir", str(data_dir),
        "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
    ]


def start_redis(data_dir: Path, port: int, *, host: str = "127.0.0.1",
                log_path: Path | None = None) -> Daemon:
    """Start a Redis server (see `redis_argv`)."""
    argv = redis_argv(data_dir, port, host=host)
    data_dir.mkdir(parents=True, exist_ok=True)
    daemon = spawn("redis", argv, log_path or data_dir.parent / "redis.log")
    daemon.ports = [port]
    wait_for_port(host, port, 30, daemon.proc, daemon.log_path)
    return daemon
