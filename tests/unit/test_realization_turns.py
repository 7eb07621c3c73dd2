"""The network realizer's turns: one run per key at a time, callers arriving while a run waits
share it, and the first run of a burst waits for the burst's other callers."""

from __future__ import annotations

import asyncio

from services.network.binding import Turns


async def _burst(turns: Turns, spacing: float) -> tuple[list[int], int]:
    runs = 0

    async def job() -> int:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.2)
        return runs

    async def caller(delay: float) -> int:
        await asyncio.sleep(delay)
        return await turns.run("pair", job)

    answers = await asyncio.gather(*(caller(i * spacing) for i in range(4)))
    return list(answers), runs


async def test_a_burst_shares_the_first_run_when_it_gathers() -> None:
    answers, runs = await _burst(Turns(gather=0.1), spacing=0.005)
    assert (answers, runs) == ([1, 1, 1, 1], 1)


async def test_without_gathering_the_rest_of_a_burst_waits_for_a_second_run() -> None:
    answers, runs = await _burst(Turns(), spacing=0.005)
    assert (answers, runs) == ([1, 2, 2, 2], 2)


async def test_a_caller_arriving_after_a_run_started_gets_the_next_one() -> None:
    answers, runs = await _burst(Turns(gather=0.01), spacing=0.05)
    assert answers[0] == 1 and answers[-1] == runs >= 2
