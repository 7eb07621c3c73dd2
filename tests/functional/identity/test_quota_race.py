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
    return (await quota.in_use(store, project_id))[0]["networks"]


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


async def test_each_service_counts_in_its_own_record(store: Store) -> None:
    """An instance and a port reserved at once both commit on their first run: neither
    compares the other's record."""
    project_id = str(uuid.uuid4())
    runs = {"compute": 0, "network": 0}
    both_read = asyncio.Barrier(2)

    async def reserving(shard: str, amounts: dict[str, int]) -> None:
        async def body(txn: Txn) -> None:
            runs[shard] += 1
            await quota.reserve(txn, project_id, amounts)
            if runs[shard] == 1:  # each has read its usage before either commits
                await both_read.wait()

        await store.atomic(body)

    await asyncio.gather(reserving("compute", {"instances": 1, "vcpus": 2}),
                         reserving("network", {"ports": 1}))

    assert runs == {"compute": 1, "network": 1}
    in_use, _ = await quota.in_use(store, project_id)
    assert (in_use["instances"], in_use["vcpus"], in_use["ports"]) == (1, 2, 1)
    for shard, key in quota.usage_keys(project_id):
        found = await store.find(key, identity_pb2.Usage)
        assert (found is not None) == (shard in runs), shard


async def test_a_usage_record_of_before_the_split_still_counts(store: Store) -> None:
    project_id = str(uuid.uuid4())
    await store.create(quota.legacy_usage_key(project_id), identity_pb2.Usage(
        project_id=project_id, in_use={"networks": 4, "instances": 2, "volumes": 1}))

    assert (await quota.in_use(store, project_id))[0]["networks"] == 4
    await create_network(store, project_id)  # the 5th of DEFAULTS' 5
    with pytest.raises(errors.ResourceExhausted):
        await create_network(store, project_id)

    in_use, _ = await quota.in_use(store, project_id)
    # Network's record now counts its resources; the others' still come from the old one.
    assert (in_use["networks"], in_use["instances"], in_use["volumes"]) == (5, 2, 1)
    network = await store.get(quota.usage_key(project_id, "network"), identity_pb2.Usage)
    assert dict(network.value.in_use) == {"networks": 5}


def test_amounts_counted_by_two_services_are_refused() -> None:
    with pytest.raises(ValueError, match="not counted by one service"):
        quota.shard_of({"ports": 1, "instances": 1})
    with pytest.raises(ValueError, match="not a usage shard"):
        quota.usage_key(str(uuid.uuid4()), "scheduler")
