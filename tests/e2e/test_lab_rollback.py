"""A lab whose start fails leaves nothing behind: no process, no lab.json, one clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.console import Console

from services.client.lab import components, daemons, runner, state
from services.common import errors


def _broken_step(ctx: components.PostStartContext) -> None:
    # What a failing bootstrap looks like to the runner: any exception at all.
    raise RuntimeError(f"cannot reach {ctx.plan.ports.etcd_endpoint}")


async def test_failed_post_start_step_stops_everything(tmp_path: Path, base_port: int) -> None:
    plan = runner.make_plan(tmp_path / "lab", nodes=1, base_port=base_port)
    seen: list[int] = []

    def record_pids(ctx: components.PostStartContext) -> None:
        lab = state.load(ctx.plan.state_dir)
        assert lab is not None
        seen.extend(p.pid for p in lab.processes)

    with pytest.raises(errors.FailedPrecondition) as caught:
        await runner.up(plan, Console(quiet=True), ready_timeout=60,
                        post_start=[record_pids, _broken_step])

    assert caught.value.reason == "nubis.lab.post_start_failed"
    assert "_broken_step failed: cannot reach" in caught.value.message
    assert len(seen) >= 2  # etcd and Redis at least were running when the step failed
    assert not any(daemons.pid_alive(pid) for pid in seen)
    assert not state.state_path(plan.state_dir).exists()
    await asyncio.sleep(0)  # ports are released once the processes are gone
    assert not any(daemons.port_open("127.0.0.1", p) for p in plan.ports.all())


async def test_component_that_exits_reports_its_log(tmp_path: Path, base_port: int) -> None:
    # etcd panics on a corrupt backend file: a real start failure, not a simulated one.
    plan = runner.make_plan(tmp_path / "lab", nodes=0, base_port=base_port)
    snap = plan.data_dir / "etcd" / "member" / "snap"
    snap.mkdir(parents=True)
    (snap / "db").write_text("garbage")

    with pytest.raises(errors.Unavailable) as caught:
        await runner.up(plan, Console(quiet=True), ready_timeout=30, post_start=[])

    assert caught.value.reason == "nubis.lab.start_failed"
    assert caught.value.message.startswith("etcd exited with code")
    assert "Last lines of" in caught.value.message and "panic" in caught.value.message
    assert not state.state_path(plan.state_dir).exists()
    assert not daemons.port_open("127.0.0.1", plan.ports.redis)


async def test_unusable_data_dir_is_a_clean_error(tmp_path: Path, base_port: int) -> None:
    plan = runner.make_plan(tmp_path / "lab", nodes=0, base_port=base_port)
    plan.data_dir.mkdir(parents=True)
    (plan.data_dir / "etcd").write_text("a file where a directory belongs")

    with pytest.raises(errors.FailedPrecondition) as caught:
        await runner.up(plan, Console(quiet=True), post_start=[])

    assert caught.value.reason == "nubis.lab.state_dir_unusable"
    assert not state.state_path(plan.state_dir).exists()
