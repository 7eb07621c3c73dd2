"""The shared quota helper under contention: the last unit goes to exactly one creator.

Each test's store holds the cloud's defaults record (DEFAULTS), as bootstrap writes it.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from nubis.identity.v1 import identity_pb2

from services.common import errors, quota
from services.common.store import Store, Txn

DEFAULTS = {"networks": 5, "ports": 50}


@pytest.fixture(autouse=True)
async def _defaults(store: Store) -> None:
    await store.create(quota.DEFAULTS_KEY, identity_pb2.Quota(limits=DEFAULTS))


def _network_key(project_id: str, network_id: str) -> str:
    return f"network/networks/{project_id}/{network_id}"


async def create_network(store: Store, project_id: str) -> str:
    """A stand-in resource written in the same transaction as its quota reservation."""
    network_id = str(uuid.uuid4())

    async def body(txn: Txn) -> None:
        await quota.reserve(txn, project_id, {"networks": 1})
        txn.create(_network_key(project_id, network_id), identity_pb2.NameIndex(id=network_id))

    await store.atomic(body, retries=64)
    return network_id


async def delete_network(store: Store, project_id: str, network_id: str) -> None:
    async def body(txn: Txn) -> None:
        if await txn.get(_network_key(project_id, network_id), identity_pb2.NameIndex) is None:
            raise errors.NotFound(network_id)
        txn.delete(_network_key(project_id, network_id))
        await quota.release(txn, project_id, {"networks": 1})

    await store.atomic(body)


async def _in_use(store: Store, project_id: str) -> int:
    usage = await store.find(quota.usage_key(project_id), identity_pb2.Usage)
    return usage.value.in_use.get("networks", 0) if usage else 0


async def _count(store: Store, project_id: str) -> int:
    items, _ = await store.list_all(f"network/networks/{project_id}/", identity_pb2.NameIndex)
    return len(items)


async def test_twenty_racers_for_the_last_unit(store: Store) -> None:
    project_id = str(uuid.uuid4())
    for _ in range(DEFAULTS["networks"] - 1):
        await create_network(store, project_id)

    results = await asyncio.gather(
        *(create_network(store, project_id) for _ in range(20)), return_exceptions=True
    )

    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if isinstance(r, errors.ResourceExhausted)]
    assert len(winners) == 1, results
    assert len(losers) == 19, results
    assert {loser.reason for loser in losers} == {"nubis.quota.exceeded"}
    assert losers[0].metadata["resource"] == "networks"
    assert losers[0].metadata["limit"] == "5"
    assert await _count(store, project_id) == 5
    assert await _in_use(store, project_id) == 5


async def test_release_frees_a_unit_for_the_next_create(store: Store) -> None:
    project_id = str(uuid.uuid4())
    created = [await create_network(store, project_id) for _ in range(DEFAULTS["networks"])]
    with pytest.raises(errors.ResourceExhausted):
        await create_network(store, project_id)
    await delete_network(store, project_id, created[0])
    assert await _in_use(store, project_id) == 4
    await create_network(store, project_id)
    assert await _count(store, project_id) == await _in_use(store, project_id) == 5


async def test_project_override_beats_default(store: Store) -> None:
    project_id = str(uuid.uuid4())
    await store.create(quota.quota_key(project_id),
                       identity_pb2.Quota(project_id=project_id, limits={"networks": 1}))
    await create_network(store, project_id)
    with pytest.raises(errors.ResourceExhausted):
        await create_network(store, project_id)


async def test_unknown_resource_and_negative_amount_are_invalid(store: Store) -> None:
    async def body(txn: Txn) -> None:
        await quota.reserve(txn, "p", {"gpus": 1, "ports": -1})

    with pytest.raises(errors.InvalidArgument) as caught:
        await store.atomic(body)
    assert {v.field for v in caught.value.violations} == {"gpus", "ports"}


async def test_unlimited_never_refuses(store: Store) -> None:
    project_id = str(uuid.uuid4())
    await store.replace(quota.DEFAULTS_KEY, identity_pb2.Quota(limits={"ports": -1}),
                        expect_revision=(await store.get(quota.DEFAULTS_KEY,
                                                         identity_pb2.Quota)).mod_revision)

    async def body(txn: Txn) -> None:
        await quota.reserve(txn, project_id, {"ports": 10_000})

    await store.atomic(body)
