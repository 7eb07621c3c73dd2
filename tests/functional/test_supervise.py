"""The supervisor of background loops: crashes are logged and restarted, bounded; outages wait."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from services.common import errors, supervise

FAST = supervise.RestartPolicy(first_delay=0.01, max_delay=0.05, give_up_after=3)


class Flaky:
    """A loop body that fails with the given exceptions, one per run, then finishes."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1
        if self.failures:
            raise self.failures.pop(0)


async def test_a_crash_is_logged_with_its_traceback_and_the_loop_restarted() -> None:
    body = Flaky(KeyError("bug"))
    stats = supervise.Stats()
    with structlog.testing.capture_logs() as logs:
        await supervise.supervise("informer", body, FAST, stats)
    assert body.runs == 2
    assert (stats.runs, stats.crashes, stats.transient_failures) == (2, 1, 0)
    crashed = [entry for entry in logs if entry["event"] == "background loop crashed; restarting"]
    assert len(crashed) == 1
    assert crashed[0]["loop"] == "informer" and crashed[0]["log_level"] == "error"
    assert isinstance(crashed[0]["exc_info"], KeyError)


async def test_crashes_in_a_row_end_with_the_last_one_raised() -> None:
    body = Flaky(*(ValueError(f"crash {n}") for n in range(10)))
    with structlog.testing.capture_logs() as logs, pytest.raises(ValueError, match="crash 2"):
        await supervise.supervise("informer", body, FAST)
    assert body.runs == 3  # give_up_after
    assert any(entry["event"] == "background loop keeps crashing; giving up" for entry in logs)


async def test_an_outage_is_retried_for_as_long_as_it_lasts_without_giving_up() -> None:
    outage = [errors.Unavailable("etcd unavailable", reason="nubis.store.unavailable")
              for _ in range(8)]
    body = Flaky(*outage, TimeoutError(), ConnectionResetError())
    stats = supervise.Stats()
    with structlog.testing.capture_logs() as logs:
        await supervise.supervise("catalog", body, FAST, stats)
    assert (stats.crashes, stats.transient_failures) == (0, 10)
    assert all(entry["log_level"] == "warning" for entry in logs)


async def test_a_healthy_run_forgives_earlier_crashes() -> None:
    policy = supervise.RestartPolicy(first_delay=0.01, max_delay=0.02, give_up_after=3,
                                     healthy_after=0.05)
    # Two quick crashes, then one after a healthy while, ...: never three in a row.
    failures = iter([True, True, False, True, False, True])

    async def body() -> None:
        quick = next(failures, None)
        if quick is None:
            return
        if not quick:
            await asyncio.sleep(0.1)
        raise RuntimeError("crash")

    await supervise.supervise("loop", body, policy)


async def test_backoff_grows_to_its_ceiling() -> None:
    policy = supervise.RestartPolicy(first_delay=0.01, max_delay=0.08)
    ceilings = [policy.first_delay * 2 ** (n - 1) for n in range(1, 7)]
    for failures, ceiling in enumerate(ceilings, start=1):
        delay = supervise._delay(policy, failures)
        assert min(ceiling, 0.08) / 2 <= delay <= min(ceiling, 0.08)


async def test_cancelling_stops_the_loop_at_once() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = supervise.start("loop", forever, FAST)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
