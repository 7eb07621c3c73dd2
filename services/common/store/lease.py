"""Leases: grant, refresh, revoke, and a background task that keeps one alive.

Keys created with a lease vanish when it expires or is revoked; that is how a
node record disappears when its agent stops refreshing.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import structlog
from aetcd import rpc

from services.common import errors
from services.common.store import client
from services.common.store.types import Lease

log = structlog.get_logger(__name__)


def _check_ttl(ttl: object) -> int:
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
        raise errors.InvalidArgument(
            f"lease ttl must be a positive number of seconds, not {ttl!r}",
            violations=[errors.FieldViolation("ttl", "must be a positive integer")],
        )
    return ttl


def _check_lease(lease: object) -> Lease:
    if not isinstance(lease, Lease):
        raise errors.InvalidArgument(
            f"expected a Lease, not {type(lease).__name__}",
            violations=[errors.FieldViolation("lease", "must be a Lease from grant_lease")],
        )
    return lease


async def grant(conn: client.Connection, ttl: int) -> Lease:
    request = rpc.LeaseGrantRequest(TTL=_check_ttl(ttl))

    async def op(member: client.Member, budget: float) -> Any:
        return await member.lease.LeaseGrant(
            request, timeout=budget, metadata=client.REQUIRE_LEADER
        )

    # A grant retried after an ambiguous failure may leave an unused lease behind;
    # it holds no keys and expires after its ttl.
    response, _ = await conn.run(op)
    if response.error:
        raise errors.Unavailable(f"etcd refused a lease: {response.error}",
                                 reason="nubis.store.unavailable")
    return Lease(id=int(response.ID), ttl=int(response.TTL))


async def refresh(conn: client.Connection, lease: Lease) -> None:
    """Reset the lease's ttl; NotFound if it already expired (its keys are gone)."""
    request = rpc.LeaseKeepAliveRequest(ID=_check_lease(lease).id)

    async def op(member: client.Member, budget: float) -> Any:
        call = member.lease.LeaseKeepAlive(
            iter([request]), timeout=budget, metadata=client.REQUIRE_LEADER
        )
        try:
            return await call.read()
        finally:
            call.cancel()

    reply, _ = await conn.run(op)
    if reply is grpc.aio.EOF or reply.TTL <= 0:
        raise errors.NotFound(f"lease {lease.id:x} expired", reason="nubis.store.lease_not_found",
                              metadata={"lease": f"{lease.id:x}"})


async def time_to_live(conn: client.Connection, lease_id: int) -> int:
    """Seconds the lease `lease_id` has left; -1 if it expired or never existed."""
    request = rpc.LeaseTimeToLiveRequest(ID=lease_id)

    async def op(member: client.Member, budget: float) -> Any:
        return await member.lease.LeaseTimeToLive(
            request, timeout=budget, metadata=client.REQUIRE_LEADER
        )

    response, _ = await conn.run(op)
    return int(response.TTL)


async def list_ids(conn: client.Connection) -> list[int]:
    """Ids of every lease etcd holds now (whoever granted it)."""
    request = rpc.LeaseLeasesRequest()

    async def op(member: client.Member, budget: float) -> Any:
        return await member.lease.LeaseLeases(
            request, timeout=budget, metadata=client.REQUIRE_LEADER
        )

    response, _ = await conn.run(op)
    return sorted(int(status.ID) for status in response.leases)


async def revoke(conn: client.Connection, lease: Lease) -> None:
    """Revoke the lease and delete its keys; a lease that already expired is fine."""
    request = rpc.LeaseRevokeRequest(ID=_check_lease(lease).id)

    async def op(member: client.Member, budget: float) -> Any:
        return await member.lease.LeaseRevoke(
            request, timeout=budget, metadata=client.REQUIRE_LEADER
        )

    with contextlib.suppress(errors.NotFound):
        await conn.run(op)


def keep_alive(conn: client.Connection, lease: Lease) -> asyncio.Task[None]:
    """A task refreshing `lease` every ttl/3 until cancelled.

    The task ends with NotFound if the lease expired anyway (e.g. etcd was out
    of reach for longer than the ttl): the keys are gone and must be recreated.
    """
    _check_lease(lease)
    return asyncio.get_running_loop().create_task(
        _keep(conn, lease), name=f"etcd-lease-{lease.id:x}"
    )


async def _keep(conn: client.Connection, lease: Lease) -> None:
    interval = max(lease.ttl / 3, 0.2)
    while True:
        try:
            await refresh(conn, lease)
            delay = interval
        except errors.Unavailable as exc:
            # Try again soon: the ttl is still running while etcd is out of reach.
            log.warning("etcd.lease_refresh_failed", lease=f"{lease.id:x}", error=str(exc))
            delay = min(interval, 0.5)
        await asyncio.sleep(delay)
