"""Bring a lab up, report on it, and take it down: the logic behind `nubis lab up|status|down`.

`up` starts the components of `components.components()` wave by wave (a wave
is every component whose dependencies are ready), records each PID in
lab.json as soon as it is spawned, waits for readiness, runs the steps due once
a component of the wave is ready (the bootstrap, after identity) before the next
wave starts, then runs the post-start steps. Any failure stops what was started and
removes the record.
`up` on a lab of which only some parts died restarts those parts, as they were
recorded, and leaves the running ones alone.
`down` stops exactly the recorded processes that are still the same processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from services.client.commands import server_defaults
from services.client.lab import components, config, daemons, health, prometheus, qemu, state
from services.client.lab.components import ComponentSpec, LabPlan, LabPorts, Readiness
from services.common import errors
from services.common.settings import TlsSettings

# An ALIVE component (no port) counts as started once it has run this long.
_ALIVE_SETTLE = 2.0
_LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ComponentStatus:
    """One recorded process as `status` reports it."""

    name: str
    pid: int
    alive: bool
    port: int | None
    health: str
    log: str


@dataclass(frozen=True)
class UpResult:
    """What `up` did: the lab record, whether it was already running, what it restarted."""

    lab: state.LabState
    already_running: bool
    restarted: list[str] = field(default_factory=list)
    """Components that had died and were started again (the others were left alone)."""


def make_plan(state_dir: Path, *, nodes: int = 2, base_port: int | None = None,
              host: str = "127.0.0.1", tls: bool = False, driver: str = qemu.TEST) -> LabPlan:
    """The plan of a lab in `state_dir`: default ports, or ports laid out from `base_port`."""
    if nodes < 0:
        raise errors.InvalidArgument("--nodes must be 0 or more",
                                     violations=[errors.FieldViolation("nodes", "negative")])
    ports = LabPorts.defaults(host) if base_port is None else LabPorts.from_base(base_port, host)
    if min(ports.all()) < 1 or max(ports.all()) > 65535:
        raise errors.InvalidArgument(
            f"--base-port {base_port} puts lab ports outside 1..65535",
            violations=[errors.FieldViolation("base_port", "out of range")])
    if driver not in qemu.DRIVERS:
        raise errors.InvalidArgument(
            f"--driver must be one of {', '.join(qemu.DRIVERS)}, not {driver}",
            violations=[errors.FieldViolation("driver", "unknown")])
    if driver == qemu.QEMU and nodes > 1:
        # One libvirtd serves the lab: two agents on it would each count the other's guests.
        raise errors.InvalidArgument(
            "--driver qemu runs one node for now; use --nodes 1",
            violations=[errors.FieldViolation("nodes", "at most 1 with --driver qemu")])
    state_dir = state_dir.resolve()
    return LabPlan(state_dir=state_dir, ports=ports, nodes=nodes,
                   config_file=state_dir / config.CONFIG_FILE, base_port=base_port, tls=tls,
                   driver=driver)


def _prepare_driver(plan: LabPlan, console: Console) -> LabPlan:
    """For a qemu lab: check the host, make its namespace and libvirtd config, probe KVM."""
    if plan.driver != qemu.QEMU:
        return plan
    qemu.preflight()
    qemu.prepare(plan.state_dir)
    from services.client.lab import seed  # seed needs components' types: import when run

    accel = qemu.accelerator(seed.make_image(plan.data_dir / "seed" / seed.IMAGE_FILE),
                             linux=_guest_linux(plan))
    console.print(f"guests run under {accel.upper()} (libvirt {qemu.uri(plan.state_dir)})",
                  soft_wrap=True)
    return dataclasses.replace(plan, accel=accel)


def _guest_linux(plan: LabPlan) -> tuple[Path, Path] | None:
    """The nubis guest's kernel and initrd, built now (cached in the data dir; seeding
    registers the same files) where the lab wants the guest; None where it cannot be built."""
    from services.client.lab import components, guest_image

    if not components.guest_wanted(plan):
        return None
    try:
        guest = guest_image.build_guest(plan.data_dir / "seed")
    except guest_image.GuestBuildError:
        return None  # seeding says why, and goes on without it
    return guest.kernel, guest.initrd


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise `up` and `down` on one state dir, so two `up`s never race."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / "lab.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


async def up(plan: LabPlan, console: Console, *, ready_timeout: float = 60.0,
             post_start: list[components.PostStartStep] | None = None) -> UpResult:
    """Start the lab of `plan`, or report that it already runs.

    `post_start` replaces the registry's post-start steps, and then no step runs
    between waves (None: use the registry's, both kinds).
    """
    with _locked(plan.state_dir):
        existing = _existing_lab(plan.state_dir)
        if existing is not None and plan.tls and not existing.tls:
            raise errors.FailedPrecondition(
                f"the lab in {plan.state_dir} runs without TLS; take it down with "
                "`nubis lab down` and start it again with `nubis lab up --tls`",
                reason="nubis.lab.tls_mismatch")
        if existing is not None:
            dead = [p for p in existing.processes if not p.is_running()]
            if not dead:
                return UpResult(existing, already_running=True)
            recorded = _prepare_driver(_recorded_plan(existing, plan), console)
            restarted = await _restart(recorded, existing, dead, ready_timeout)
            return UpResult(existing, already_running=False, restarted=restarted)
        check_ports_free(plan.ports)
        plan = _prepare_driver(plan, console)
        try:
            specs = components.components(plan)
        except daemons.MissingBinary as exc:
            raise errors.FailedPrecondition(str(exc), reason="nubis.lab.missing_binary") from exc
        config.write_config(plan)
        lab = state.LabState(state_dir=str(plan.state_dir), host=plan.ports.host,
                             created=time.time(), nodes=plan.nodes, base_port=plan.base_port,
                             tls=plan.tls, driver=plan.driver)
        context = components.PostStartContext(plan=plan, console=console)
        try:
            await _start_all(plan, specs, lab, ready_timeout, context=context,
                             after_ready=components.after_ready_steps()
                             if post_start is None else {})
            steps = components.post_start_steps() if post_start is None else post_start
            _run_post_start(steps, context)
        except BaseException:
            # Whatever went wrong (even Ctrl-C), leave nothing running behind.
            _stop_lab(plan.state_dir, lab.processes, grace=5.0)
            state.remove(plan.state_dir)
            raise
        return UpResult(lab, already_running=False)


def _run_post_start(steps: list[components.PostStartStep],
                    ctx: components.PostStartContext) -> None:
    for step in steps:
        try:
            step(ctx)
        except errors.NubisError:
            raise
        except Exception as exc:
            # A step is free to fail any way it likes; the operator still gets one clear line.
            name = getattr(step, "__name__", repr(step))
            raise errors.FailedPrecondition(
                f"post-start step {name} failed: {exc}", reason="nubis.lab.post_start_failed",
                metadata={"step": name},
            ) from exc


def _existing_lab(state_dir: Path) -> state.LabState | None:
    """The recorded lab if any of it runs; None (record cleaned) if all of it is gone."""
    lab = state.load(state_dir)
    if lab is None or not any(p.is_running() for p in lab.processes):
        state.remove(state_dir)
        return None
    return lab


def _recorded_plan(lab: state.LabState, asked: LabPlan) -> LabPlan:
    """The plan the running lab was started with (a restart must match what still runs)."""
    if lab.nodes is None:  # recorded before the layout was kept: trust the command line
        return asked
    return make_plan(asked.state_dir, nodes=lab.nodes, base_port=lab.base_port, host=lab.host,
                     tls=lab.tls, driver=lab.driver)


async def _restart(plan: LabPlan, lab: state.LabState, dead: list[state.ProcessRecord],
                   ready_timeout: float) -> list[str]:
    """Start the `dead` parts of `lab` again, wave by wave; leave the running ones alone.

    A restarted part that does not become ready is stopped again and the error
    raised; its record then shows it stopped, so the next `up` tries again.
    """
    specs = {spec.name: spec for spec in components.components(plan)}
    unknown = [record.name for record in dead if record.name not in specs]
    if unknown:
        raise errors.FailedPrecondition(
            f"cannot restart {', '.join(unknown)}: not part of this lab any more; "
            "run `nubis lab down` and then `nubis lab up`", reason="nubis.lab.partly_running")
    _check_free(plan.ports.host, dead)
    config.write_config(plan)
    env = config.child_environment(plan)
    for wave in sorted({record.wave for record in dead}):
        started: list[tuple[ComponentSpec, daemons.Daemon]] = []
        for record in [r for r in dead if r.wave == wave]:
            spec = specs[record.name]
            daemon = _spawn(plan, spec, env)
            started.append((spec, daemon))
            lab.processes[lab.processes.index(record)] = state.record(
                spec.name, daemon, readiness=spec.readiness.value, wave=wave,
                port=spec.port, ports=spec.ports, health_path=spec.health_path)
            state.save(lab, plan.state_dir)
        try:
            await _wait_ready(plan, started, ready_timeout)
        except BaseException:
            daemons.stop_pids([daemon.pid for _, daemon in started], 5.0)
            raise
    return [record.name for record in dead]


def _check_free(host: str, records: list[state.ProcessRecord]) -> None:
    """Every port of the parts to restart must be free (not taken by another process)."""
    for record in records:
        for port in sorted({*record.ports.values(), *([record.port] if record.port else [])}):
            if not port_free(host, port):
                raise errors.FailedPrecondition(
                    f"cannot restart {record.name}: its port {port} on {host} is in use by "
                    "another process", reason="nubis.lab.port_in_use",
                    metadata={"port": str(port), "component": record.name})


async def _start_all(plan: LabPlan, specs: list[ComponentSpec], lab: state.LabState,
                     ready_timeout: float, *,
                     context: components.PostStartContext | None = None,
                     after_ready: dict[str, list[components.PostStartStep]] | None = None,
                     ) -> None:
    """Start `specs` wave by wave; once a wave is ready, run its components' `after_ready`
    steps (with `context`) before the next wave starts."""
    env = config.child_environment(plan)
    for wave_index, wave in enumerate(waves(specs)):
        started: list[tuple[ComponentSpec, daemons.Daemon]] = []
        for spec in wave:
            daemon = _spawn(plan, spec, env)
            started.append((spec, daemon))
            lab.processes.append(state.record(
                spec.name, daemon, readiness=spec.readiness.value, wave=wave_index,
                port=spec.port, ports=spec.ports, health_path=spec.health_path))
            # Saved after every spawn: an interrupted `up` still lets `down` find it.
            state.save(lab, plan.state_dir)
        await _wait_ready(plan, started, ready_timeout)
        due = [step for spec in wave for step in (after_ready or {}).get(spec.name, [])]
        if due and context is not None:
            # Blocking steps (a subprocess): off the loop, which has nothing else to run now.
            await asyncio.to_thread(_run_post_start, due, context)


def _spawn(plan: LabPlan, spec: ComponentSpec, env: dict[str, str]) -> daemons.Daemon:
    for arg in [str(plan.data_dir), *spec.argv, *spec.env.values()]:
        # etcd and Redis refuse to start when their data directory is missing.
        if arg.startswith(str(plan.data_dir)):
            try:
                Path(arg).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise errors.FailedPrecondition(
                    f"cannot create the data directory {arg} of {spec.name}: {exc.strerror}",
                    reason="nubis.lab.state_dir_unusable", metadata={"path": arg},
                ) from exc
    child_env = {**env, **spec.env}
    if not spec.uses_config:
        child_env.pop("NUBIS_CONFIG", None)
    return daemons.spawn(spec.name, spec.argv, plan.log_dir / f"{spec.name}.log",
                         env=child_env, cwd=plan.state_dir)


def waves(specs: list[ComponentSpec]) -> list[list[ComponentSpec]]:
    """Group specs into start waves: each wave depends only on earlier ones."""
    known = {spec.name for spec in specs}
    done: set[str] = set()
    pending = list(specs)
    result: list[list[ComponentSpec]] = []
    while pending:
        # A dependency that is not part of this lab (a service not written yet) is ignored.
        wave = [s for s in pending if all(d in done or d not in known for d in s.depends_on)]
        if not wave:
            names = ", ".join(s.name for s in pending)
            raise errors.FailedPrecondition(f"lab components depend on each other in a cycle: "
                                            f"{names}", reason="nubis.lab.dependency_cycle")
        result.append(wave)
        done.update(s.name for s in wave)
        pending = [s for s in pending if s.name not in done]
    return result


async def _wait_ready(plan: LabPlan, started: list[tuple[ComponentSpec, daemons.Daemon]],
                      ready_timeout: float) -> None:
    """Wait until every started component is ready; fail with its log tail if one is not."""
    host, tls = plan.ports.host, config.client_tls(plan.state_dir, plan.tls)
    began = time.monotonic()
    pending = list(started)
    last: dict[str, str] = {}
    while pending:
        for spec, daemon in list(pending):
            if daemon.proc.poll() is not None:
                raise _start_failure(spec, daemon, f"exited with code {daemon.proc.returncode}")
            last[spec.name] = await _probe(host, spec, time.monotonic() - began, tls)
            if last[spec.name] in (health.SERVING, health.LISTENING):
                pending.remove((spec, daemon))
        if pending and time.monotonic() - began > ready_timeout:
            spec, daemon = pending[0]
            raise _start_failure(spec, daemon, f"was not ready after {ready_timeout:.0f}s "
                                 f"(health: {last.get(spec.name, 'unknown')})")
        if pending:
            await asyncio.sleep(0.1)


async def _probe(host: str, spec: ComponentSpec, running_for: float,
                 tls: TlsSettings | None) -> str:
    if spec.readiness is Readiness.GRPC and spec.port is not None:
        return await health.grpc_health(f"{host}:{spec.port}", tls=tls)
    if spec.readiness is Readiness.HTTP and spec.port is not None:
        url = f"http://{host}:{spec.port}{spec.health_path}"
        return await asyncio.to_thread(health.http_health, url)
    if spec.readiness is Readiness.TCP and spec.port is not None:
        return health.tcp_health(host, spec.port)
    return health.SERVING if running_for >= _ALIVE_SETTLE else health.NOT_SERVING


def _start_failure(spec: ComponentSpec, daemon: daemons.Daemon, what: str) -> errors.Unavailable:
    tail = log_tail(daemon.log_path)
    return errors.Unavailable(
        f"{spec.name} {what}. Last lines of {daemon.log_path}:\n{tail}",
        reason="nubis.lab.start_failed", metadata={"component": spec.name},
    )


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def check_ports_free(ports: LabPorts) -> None:
    """Raise FailedPrecondition naming the first busy port and a --base-port that is free."""
    for port in ports.all():
        if not port_free(ports.host, port):
            suggestion = find_free_base(ports.host)
            hint = f" --base-port {suggestion}" if suggestion else " --base-port P"
            raise errors.FailedPrecondition(
                f"port {port} on {ports.host} is already in use (another lab or service?); "
                f"start this lab on other ports with{hint}",
                reason="nubis.lab.port_in_use", metadata={"port": str(port)},
            )


def port_free(host: str, port: int) -> bool:
    """True if nothing listens on host:port and a server could bind it."""
    if daemons.port_open(host, port):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers bind with SO_REUSEADDR, so ports in TIME_WAIT count as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_base(host: str = "127.0.0.1", start: int = 17500, stop: int = 60000,
                   step: int = 1000) -> int | None:
    """The first base port from `start` whose every lab port is free, or None."""
    for base in range(start, stop, step):
        if all(port_free(host, port) for port in LabPorts.from_base(base, host).all()):
            return base
    return None


def recorded_lab(state_dir: Path) -> state.LabState:
    """The lab recorded in `state_dir`; NotFound if there is none."""
    lab = state.load(state_dir.resolve())
    if lab is None:
        raise errors.NotFound(f"no lab is recorded in {state_dir.resolve()}; "
                              "start one with `nubis lab up`", reason="nubis.lab.not_running")
    return lab


async def status(lab: state.LabState) -> list[ComponentStatus]:
    """The state of every recorded process, probed concurrently."""
    tls = config.client_tls(Path(lab.state_dir), lab.tls)
    results = await asyncio.gather(*(_status_of(lab.host, p, tls) for p in lab.processes))
    return list(results)


async def _status_of(host: str, record: state.ProcessRecord,
                     tls: TlsSettings | None) -> ComponentStatus:
    alive = record.is_running()
    if not alive:
        verdict = "stopped"
    elif record.readiness == Readiness.GRPC.value and record.port is not None:
        verdict = await health.grpc_health(f"{host}:{record.port}", tls=tls)
    elif record.readiness == Readiness.HTTP.value and record.port is not None:
        url = f"http://{host}:{record.port}{record.health_path}"
        verdict = await asyncio.to_thread(health.http_health, url)
    elif record.port is not None:
        verdict = health.tcp_health(host, record.port)
    else:
        verdict = "running"
    return ComponentStatus(record.name, record.pid, alive, record.port, verdict, record.log)


@dataclass(frozen=True)
class DownResult:
    """What `down` did, process by process."""

    stopped: list[str]
    already_gone: list[str]
    recorded: bool


def down(state_dir: Path, *, purge: bool = False, grace: float = 10.0) -> DownResult:
    """Stop the recorded processes in reverse start order; with `purge`, delete the lab's data."""
    state_dir = state_dir.resolve()
    if not state_dir.is_dir():
        return DownResult([], [], recorded=False)  # and do not create it just to lock it
    with _locked(state_dir):
        lab = state.load(state_dir)
        records = lab.processes if lab is not None else []
        running = [p for p in records if p.is_running()]
        gone = [p.name for p in records if p not in running]
        _stop_lab(state_dir, running, grace=grace)
        state.remove(state_dir)
        if purge:
            _purge(state_dir)
        stopped = [p.name for p in sorted(running, key=lambda p: p.wave, reverse=True)]
        return DownResult(stopped, gone, lab is not None)


def _stop_lab(state_dir: Path, records: list[state.ProcessRecord], *, grace: float) -> None:
    """Stop the records; in a qemu lab end its guests first and delete its namespaces after."""
    if not qemu.is_qemu_lab(state_dir):
        _stop_records(records, grace=grace)
        return
    agents = [r for r in records if r.name.startswith("nubis-agent-")]
    _stop_records(agents, grace=grace)
    qemu.destroy_guests(state_dir)
    _stop_records([r for r in records if r not in agents], grace=grace)
    qemu.cleanup(state_dir)


def _stop_records(records: list[state.ProcessRecord], *, grace: float) -> None:
    """Stop wave by wave, last wave first, so services go before etcd and Redis."""
    for wave in sorted({r.wave for r in records}, reverse=True):
        pids = [r.pid for r in records if r.wave == wave and r.is_running()]
        daemons.stop_pids(pids, grace)


def _purge(state_dir: Path) -> None:
    for name in ("data", "logs", "tls", "libvirt"):
        shutil.rmtree(state_dir / name, ignore_errors=True)
    # The credentials come from the admin bootstrap: useless once the data is gone.
    for name in (config.CONFIG_FILE, "credentials.json", components.ADMIN_CREDENTIALS,
                 config.SERVICE_PASSWORD_FILE, components.REDIS_PASSWORD_FILE,
                 components.REDIS_CONFIG_FILE, prometheus.PROMETHEUS_FILE,
                 server_defaults.DEFAULTS_FILE, "lab.lock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_dir / name)
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if nothing else was left in it
