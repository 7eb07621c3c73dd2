"""Every RPC of every service, called by every kind of caller, answers the expected code."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory

from tests.functional.authz import table
from tests.functional.authz.world import BAD_TOKENS, CALLERS, EXTRA_CALLERS, World

_ROWS = [row for row in table.ROWS]
_CALLER_CASES = [
    pytest.param(row, caller, id=f"{row.name}-{caller}")
    for row in _ROWS if not row.public
    for caller in (*CALLERS, *(extra for extra in EXTRA_CALLERS if extra in row.expect))
]
_REFUSED_CASES = [
    pytest.param(row, token, id=f"{row.name}-{token}")
    for row in _ROWS if not row.public for token in BAD_TOKENS
]
_PUBLIC_CASES = [pytest.param(row, id=row.name) for row in _ROWS if row.public]


async def _code(world: World, row: table.Row, caller: str) -> grpc.StatusCode:
    request = await row.request(world)
    try:
        reply = await world.call(row.service, row.method, request, caller)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    if row.check is not None:
        row.check(world, caller, reply)
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("row", "caller"), _CALLER_CASES)
async def test_valid_callers(world: World, row: table.Row, caller: str) -> None:
    assert await _code(world, row, caller) == row.expect[caller]


@pytest.mark.parametrize(("row", "token"), _REFUSED_CASES)
async def test_refused_tokens(world: World, row: table.Row, token: str) -> None:
    assert await _code(world, row, token) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("row", _PUBLIC_CASES)
async def test_public_methods_need_no_token(world: World, row: table.Row) -> None:
    assert await _code(world, row, "none") == row.expect["none"]


async def _unwritten(world: World, service: str, method: str) -> bool:
    """True while the RPC is the generated base (UNIMPLEMENTED): it needs no row yet."""
    descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
    request = message_factory.GetMessageClass(descriptor.input_type)()
    try:
        await world.call(service, method, request, "cloud_admin")
    except grpc.aio.AioRpcError as exc:
        return exc.code() == grpc.StatusCode.UNIMPLEMENTED
    return False


async def test_every_rpc_has_a_row(world: World) -> None:
    """A service that gains an RPC must say in this table who may call it."""
    services = {"nubis.identity.v1.IdentityService", *table.SERVICES}
    covered = {(row.service, row.method) for row in _ROWS}
    pool = descriptor_pool.Default()
    missing = [
        f"{name}/{method.name}"
        for name in sorted(services)
        for method in pool.FindServiceByName(name).methods
        if (name, method.name) not in covered
        and not await _unwritten(world, name, method.name)
    ]
    assert not missing, f"RPCs without authorization rows: {missing}"
