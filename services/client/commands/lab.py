"""`nubis lab up|status|down`: an all-in-one nubis on this machine, started and stopped by PID."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from services.client import cli_context
from services.client.lab import runner, state
from services.client.output import Output

app = typer.Typer(help="Run a local all-in-one lab: etcd, Redis, every nubis service, agents.",
                  no_args_is_help=True)

StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", help="Lab state directory (default: --lab-dir, NUBIS_LAB_DIR or ./.nubis-lab).",
)]


def _state_dir(ctx: typer.Context, state_dir: Path | None) -> Path:
    return state_dir if state_dir is not None else cli_context.get(ctx).lab_dir


@app.command()
def up(
    ctx: typer.Context,
    nodes: Annotated[int | None, typer.Option(
        "--nodes", min=0, help="Number of agents (default 2; 1 with --driver qemu).")] = None,
    state_dir: StateDir = None,
    base_port: Annotated[int | None, typer.Option(
        "--base-port", min=1, max=65000,
        help="Lay every lab port out from this one (services P..P+4, metrics P+100.., "
             "etcd P+50/P+51, Redis P+52) instead of the defaults.",
    )] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds each start wave may take to become ready.")] = 60.0,
    tls: Annotated[bool, typer.Option(
        "--tls", help="Make a lab CA and certificates (under <state-dir>/tls) and run every "
                      "gRPC hop with mutual TLS; Redis asks for a generated password.")] = False,
    driver: Annotated[str, typer.Option(
        "--driver", help="The agents' libvirt: 'test' (test:///default) or 'qemu' (real guests "
                         "under a lab-private libvirtd, KVM where it runs guests, else TCG; "
                         "needs root).")] = "test",
) -> None:
    """Start etcd, Redis, every nubis service and the agents; detached, logs in the state dir."""
    out = cli_context.get(ctx).output
    default_nodes = 1 if driver == "qemu" else 2
    plan = runner.make_plan(_state_dir(ctx, state_dir),
                            nodes=default_nodes if nodes is None else nodes,
                            base_port=base_port, tls=tls, driver=driver)
    console = out.err if out.json else out.console
    result = asyncio.run(runner.up(plan, console, ready_timeout=timeout))
    if result.already_running:
        out.note(f"The lab in {plan.state_dir} is already up; nothing was started.")
    if result.restarted:
        out.note(f"Restarted: {', '.join(result.restarted)} (the rest was running and "
                 "was left alone).")
    _print_lab(out, result.lab)
    if not result.already_running and not result.restarted and not out.json:
        _print_next_steps(out, plan.state_dir)


@app.command()
def status(
    ctx: typer.Context,
    state_dir: StateDir = None,
) -> None:
    """Show every lab process: PID, alive, port, health. Exit 1 unless all are up and healthy."""
    out = cli_context.get(ctx).output
    lab = runner.recorded_lab(_state_dir(ctx, state_dir))
    statuses = asyncio.run(runner.status(lab))
    rows = [
        {"name": s.name, "pid": s.pid, "alive": s.alive, "port": s.port, "health": s.health,
         "log": s.log}
        for s in statuses
    ]
    out.table(rows, ["name", "pid", "alive", "port", "health"], title="nubis lab")
    if statuses and not out.json:
        out.note(f"Logs: {Path(statuses[0].log).parent}/<name>.log")
    healthy = all(s.alive and s.health in ("SERVING", "listening", "running") for s in statuses)
    if not healthy:
        raise typer.Exit(1)


@app.command()
def down(
    ctx: typer.Context,
    state_dir: StateDir = None,
    purge: Annotated[bool, typer.Option(
        "--purge", help="Also delete the lab's data and logs.")] = False,
    grace: Annotated[float, typer.Option(
        "--grace", min=0.0, help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
) -> None:
    """Stop exactly the processes `up` started (newest first); data stays unless --purge."""
    out = cli_context.get(ctx).output
    result = runner.down(_state_dir(ctx, state_dir), purge=purge, grace=grace)
    if out.json:
        out.emit_json({"stopped": result.stopped, "already_gone": result.already_gone,
                       "purged": purge})
        return
    if not result.recorded:
        out.note("No lab is recorded there; nothing to stop.")
    if result.stopped:
        out.note(f"Stopped: {', '.join(result.stopped)}.")
    if result.already_gone:
        out.note(f"Already gone (left alone): {', '.join(result.already_gone)}.")
    if purge:
        out.note("Lab data and logs deleted.")


def _print_lab(out: Output, lab: state.LabState) -> None:
    if out.json:
        out.emit_json(lab.to_json())
        return
    rows = [
        {"name": p.name, "pid": p.pid,
         "endpoint": f"{lab.host}:{p.port}" if p.port is not None else "",
         "metrics": f"{lab.host}:{p.ports['metrics']}" if "metrics" in p.ports else "",
         "log": p.log}
        for p in lab.processes
    ]
    out.table(rows, ["name", "pid", "endpoint", "metrics"], title="nubis lab endpoints")
    if lab.tls:
        out.note(f"TLS: every service asks for a client certificate of the lab CA "
                 f"{Path(lab.state_dir) / 'tls' / 'ca.pem'}; Redis asks for the password in "
                 f"{Path(lab.state_dir) / 'redis-password'}; etcd is plaintext on {lab.host}.")


def _print_next_steps(out: Output, state_dir: Path) -> None:
    flag = "" if state_dir == Path(cli_context.DEFAULT_LAB_DIR).resolve() else (
        f" --state-dir {state_dir}")
    out.note(
        "\nNext steps:\n"
        f"  nubis lab status{flag}   # health of every process\n"
        "  nubis image list; nubis network list   # the image and networks the lab made\n"
        "  nubis server create demo --wait   # the lab's defaults (server-defaults.json), or:\n"
        "  nubis server create demo --flavor m1.tiny --image lab-hello --network private --wait\n"
        "  nubis server console-log demo; nubis server delete demo --wait\n"
        f"  nubis lab down{flag}     # stop it (add --purge to delete its data)\n"
        f"  logs: {state_dir / 'logs'}/<name>.log\n"
        f"  metrics: prometheus --config.file={state_dir / 'prometheus.yml'}\n"
        f"  export NUBIS_LAB_DIR={state_dir}   # let other nubis commands find this lab"
    )
