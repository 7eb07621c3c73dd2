"""Supervised background loops: a failure is logged and the loop restarted with backoff.

A service's long-running loops (informers, watches, keepers) run through
`supervise`, so none of them can die silently and leave the process serving
from a frozen view. Two kinds of failure are told apart:

- transient (etcd out of reach, a timeout): logged as a warning and retried
  with backoff for as long as it lasts, since an etcd outage must not end
  every service;
- a crash (any other exception, i.e. a bug or a record the code cannot
  handle): logged with its traceback and retried with the same backoff, until
  `RestartPolicy.give_up_after` crashes follow each other without a healthy
  run between them. The last crash is then raised: the background task fails
  and the server bootstrap ends the service (exit 1) for its process manager
  (systemd, compose, `nubis lab up`) to restart.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from services.common import errors

log = structlog.get_logger(__name__)

Body = Callable[[], Awaitable[None]]

TRANSIENT: tuple[type[BaseException], ...] = (errors.Unavailable, TimeoutError, ConnectionError)
"""Failures that say "etcd (or a peer) is out of reach right now", not "the code is wrong"."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervised loop is restarted after it fails."""

    first_delay: float = 0.2
    """Seconds before the first restart; doubled after each failure in a row."""
    max_delay: float = 5.0
    """Longest wait between two restarts (also while etcd is out of reach)."""
    healthy_after: float = 30.0
    """A run that lasted this long was healthy: the delay and the crash count start over."""
    give_up_after: int = 5
    """Crashes in a row after which the supervisor raises the last one; 0 never gives up."""
    transient: tuple[type[BaseException], ...] = field(default=TRANSIENT)
    """Exception types retried without counting as crashes."""


@dataclass
class Stats:
    """What a supervisor has seen, for tests and metrics."""

    runs: int = 0
    crashes: int = 0
    transient_failures: int = 0


def _delay(policy: RestartPolicy, failures_in_a_row: int) -> float:
    """Jittered exponential backoff, so replicas restarting together spread out."""
    ceiling = min(policy.max_delay, policy.first_delay * 2 ** max(failures_in_a_row - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


async def supervise(
    name: str, body: Body, policy: RestartPolicy | None = None, stats: Stats | None = None
) -> None:
    """Run `body()` until it returns, restarting it after each failure (see the module doc).

    Returns when `body` returns; raises the last crash once the policy gives up.
    Cancellation stops it at once.
    """
    policy = policy or RestartPolicy()
    stats = stats if stats is not None else Stats()
    loop = asyncio.get_running_loop()
    failures = crashes = 0
    while True:
        started = loop.time()
        stats.runs += 1
        try:
            await body()
            return
        except policy.transient as exc:
            stats.transient_failures += 1
            error: BaseException = exc
            transient = True
        except Exception as exc:
            stats.crashes += 1
            error, transient = exc, False
        if loop.time() - started >= policy.healthy_after:
            failures = crashes = 0
        failures += 1
        delay = _delay(policy, failures)
        if transient:
            log.warning("background loop interrupted; retrying", loop=name,
                        error=str(error) or type(error).__name__, retry_in=round(delay, 2))
        else:
            crashes += 1
            if policy.give_up_after and crashes >= policy.give_up_after:
                log.error("background loop keeps crashing; giving up", loop=name,
                          crashes=crashes, exc_info=error)
                raise error
            log.error("background loop crashed; restarting", loop=name, crashes=crashes,
                      retry_in=round(delay, 2), exc_info=error)
        await asyncio.sleep(delay)


def start(
    name: str, body: Body, policy: RestartPolicy | None = None, stats: Stats | None = None
) -> asyncio.Task[None]:
    """`supervise` as a named task (give it to `ServiceParts.background` to be watched)."""
    return asyncio.get_running_loop().create_task(
        supervise(name, body, policy, stats), name=name
    )
