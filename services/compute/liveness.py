"""Node liveness while an operation awaits its agent: a DOWN node is not waited on.

An agent task waits its whole deadline for an answer (spawn: minutes) and
an operation sends it again after each unanswered try, so a node that died
mid-task would be noticed only after several deadlines. `NodeLiveness`
asks the scheduler for the node's state (UP while its agent holds its
lease) every `node_check_interval` seconds during such a wait; once the
node is DOWN the wait ends with Unavailable `nubis.compute.node_unavailable`
at once (a build reschedules, other operations fail with that fault).

The states are shared by every operation of the replica: one GetNode per
node per interval, however many operations wait on it. A scheduler out of
reach or a node it does not know is never taken as DOWN: the deadline
still ends the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import structlog
from nubis.scheduler.v1 import scheduler_pb2

from services.client import peers
from services.common import errors

log = structlog.get_logger(__name__)

T = TypeVar("T")
NODE_UNAVAILABLE = "nubis.compute.node_unavailable"


class NodeLiveness:
    """Cached node states (asked at most once per `interval` per node) and the waits on them."""

    def __init__(self, clients: peers.ServiceClients, interval: float) -> None:
        self._clients = clients
        self.interval = interval
        self._seen: dict[str, tuple[float, bool]] = {}
        self._asking: dict[str, asyncio.Future[bool]] = {}

    async def down(self, node: str) -> bool:
        """True if the scheduler reports `node` DOWN (its agent's lease lapsed)."""
        now = asyncio.get_running_loop().time()
        seen = self._seen.get(node)
        if seen is not None and now - seen[0] < self.interval:
            return seen[1]
        asking = self._asking.get(node)
        if asking is None:
            asking = self._asking[node] = asyncio.ensure_future(self._ask(node))
            asking.add_done_callback(lambda _: self._asking.pop(node, None))
        return await asyncio.shield(asking)

    async def _ask(self, node: str) -> bool:
        try:
            found = await self._clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=node))
            is_down = found.state == scheduler_pb2.NODE_STATE_DOWN
        except errors.NubisError as exc:
            log.debug("node state unknown", node=node, error=exc.message)
            is_down = False
        self._seen[node] = (asyncio.get_running_loop().time(), is_down)
        return is_down

    async def awaiting(self, node: str, what: str, answer: Awaitable[T]) -> T:
        """`answer`, unless `node` is seen DOWN first (then Unavailable, `answer` cancelled)."""
        waiting = asyncio.ensure_future(answer)
        try:
            seen = self._seen.get(node)
            known_down = seen is not None and seen[1]  # last seen DOWN: look again at once
            while True:
                if not known_down:
                    done, _ = await asyncio.wait({waiting}, timeout=self.interval)
                    if done:
                        return waiting.result()
                known_down = False
                if await self.down(node):
                    log.warning("node is DOWN; not waiting for its answer", node=node, task=what)
                    raise errors.Unavailable(
                        f"node {node} is DOWN (its agent's lease lapsed) while awaiting {what}",
                        reason=NODE_UNAVAILABLE, metadata={"node": node, "down": "true"})
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError, errors.NubisError):
                    await waiting
