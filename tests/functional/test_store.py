"""The etcd store against a real etcd: typed reads and writes, races, errors, leases."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import wrappers_pb2

from services.client.lab import daemons
from services.common import errors
from services.common.store import Lease, Store, Txn, Versioned
from tests.conftest import EtcdEndpoint

Counter = wrappers_pb2.Int64Value
Text = wrappers_pb2.StringValue


def increment(counter: Counter) -> Counter:
    counter.value += 1
    return counter


async def test_get_of_missing_key_is_not_found(store: Store) -> None:
    with pytest.raises(errors.NotFound):
        await store.get("compute/instances/missing", Counter)
    assert await store.find("compute/instances/missing", Counter) is None


async def test_create_then_get_returns_the_message_and_revisions(store: Store) -> None:
    created = await store.create("compute/flavors/small", Text(value="2 vCPU"))
    got = await store.get("compute/flavors/small", Text)
    assert got == Versioned("compute/flavors/small", Text(value="2 vCPU"),
                            created.mod_revision, created.create_revision)
    assert got.mod_revision == got.create_revision > 0


async def test_keys_live_under_the_root(store: Store, etcd: EtcdEndpoint) -> None:
    await store.create("a/b", Counter(value=1))
    other = await Store.connect([etcd.endpoint], root=store.root + "-other")
    try:
        assert await other.find("a/b", Counter) is None
    finally:
        await other.close()


async def test_replace_with_stale_revision_is_conflict(store: Store) -> None:
    first = await store.create("k", Counter(value=1))
    second = await store.replace("k", Counter(value=2), expect_revision=first.mod_revision)
    assert second.mod_revision > first.mod_revision
    assert second.create_revision == first.create_revision
    with pytest.raises(errors.Conflict):
        await store.replace("k", Counter(value=3), expect_revision=first.mod_revision)
    assert (await store.get("k", Counter)).value.value == 2
    with pytest.raises(errors.NotFound):
        await store.replace("gone", Counter(value=3), expect_revision=first.mod_revision)


async def test_delete_compares_and_reports_missing(store: Store) -> None:
    first = await store.create("k", Counter(value=1))
    await store.update("k", Counter, increment)
    with pytest.raises(errors.Conflict):
        await store.delete("k", expect_revision=first.mod_revision)
    await store.delete("k")
    with pytest.raises(errors.NotFound):
        await store.delete("k")
    with pytest.raises(errors.NotFound):
        await store.update("k", Counter, increment)


async def test_update_that_changes_nothing_writes_nothing(store: Store) -> None:
    first = await store.create("k", Counter(value=1))
    same = await store.update("k", Counter, lambda c: c)
    assert same.mod_revision == first.mod_revision


async def test_update_aborted_by_a_domain_error_writes_nothing(store: Store) -> None:
    await store.create("k", Counter(value=1))

    def refuse(counter: Counter) -> Counter:
        counter.value = 99
        raise errors.FailedPrecondition("instance is not stopped")

    with pytest.raises(errors.FailedPrecondition):
        await store.update("k", Counter, refuse)
    assert (await store.get("k", Counter)).value.value == 1


BAD_KEYS: list[Any] = ["", "a/../b", "..", "/absolute", "a//b", "trailing/", "nul\x00", 5, None,
                       b"bytes", "x" * 2000]


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_bad_keys_are_invalid_argument(store: Store, key: Any) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.get(key, Counter)
    with pytest.raises(errors.InvalidArgument):
        await store.create(key, Counter(value=1))
    with pytest.raises(errors.InvalidArgument):
        await store.update(key, Counter, increment)
    with pytest.raises(errors.InvalidArgument):
        await store.delete(key)


@pytest.mark.parametrize("prefix", ["../x", "/abs", 7, "a//"])
async def test_bad_prefixes_are_invalid_argument(store: Store, prefix: Any) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.list(prefix, Counter)
    with pytest.raises(errors.InvalidArgument):
        await anext(aiter(store.watch(prefix, Counter, start_revision=1)))


@pytest.mark.parametrize("token", ["garbage", "dGhpcyBpcyBub3QgYSB0b2tlbg", 5])
async def test_bad_page_token_is_invalid_argument(store: Store, token: Any) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.list("items/", Counter, page_token=token)


async def test_page_token_of_another_listing_is_invalid_argument(store: Store) -> None:
    for i in range(3):
        await store.create(f"a/{i}", Counter(value=i))
    page = await store.list("a/", Counter, page_size=1)
    assert page.next_page_token
    with pytest.raises(errors.InvalidArgument):
        await store.list("b/", Counter, page_token=page.next_page_token)


@pytest.mark.parametrize("bad", [0, -1, True])
async def test_bad_revisions_and_sizes_are_invalid_argument(store: Store, bad: Any) -> None:
    await store.create("k", Counter(value=1))
    with pytest.raises(errors.InvalidArgument):
        await store.replace("k", Counter(value=2), expect_revision=bad)
    with pytest.raises(errors.InvalidArgument):
        await store.list("", Counter, page_size=bad)


async def test_non_message_value_is_invalid_argument(store: Store) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.create("k", "not a message")  # type: ignore[type-var]


async def test_oversized_value_is_invalid_argument(store: Store) -> None:
    with pytest.raises(errors.InvalidArgument):
        await store.create("big", Text(value="x" * (2 * 1024 * 1024)))


async def test_unreachable_etcd_is_unavailable() -> None:
    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        await Store.connect(["127.0.0.1:1"], timeout=1.0)
    assert time.monotonic() - started < 3


async def test_etcd_gone_after_connect_is_unavailable_within_the_timeout(
    tmp_path: Path, key_prefix: str
) -> None:
    port, peer = daemons.free_port(), daemons.free_port()
    etcd = daemons.start_etcd(tmp_path / "etcd", port, peer)
    try:
        store = await Store.connect([f"127.0.0.1:{port}"], root=key_prefix, timeout=1.0)
        await store.create("k", Counter(value=1))
    finally:
        etcd.stop()
    try:
        for call in (store.get("k", Counter), store.create("k2", Counter(value=2))):
            started = time.monotonic()
            with pytest.raises(errors.Unavailable) as caught:
                await call
            # Retried until the deadline of the call, not beyond it.
            assert 0.5 < time.monotonic() - started < 2.0
            assert caught.value.reason == "nubis.store.unavailable"
    finally:
        await store.close()


async def test_bad_endpoints_are_invalid_argument() -> None:
    for endpoints in ([], ["no-port"], ["host:99999"]):
        with pytest.raises(errors.InvalidArgument):
            await Store.connect(endpoints)


async def test_closed_store_is_unavailable(etcd: EtcdEndpoint, key_prefix: str) -> None:
    closed = await Store.connect([etcd.endpoint], root=key_prefix)
    await closed.close()
    with pytest.raises(errors.Unavailable):
        await closed.get("k", Counter)


async def test_twenty_concurrent_updates_lose_nothing(store: Store) -> None:
    await store.create("counter", Counter(value=0))
    # Twenty writers on one key: the last may lose to all the others more times
    # than the default retries on a loaded machine; losing nothing is the point.
    results = await asyncio.gather(
        *(store.update("counter", Counter, increment, retries=64) for _ in range(20))
    )
    assert (await store.get("counter", Counter)).value.value == 20
    # Every writer saw a distinct value: no two increments were based on the same read.
    assert sorted(r.value.value for r in results) == list(range(1, 21))


async def test_twenty_concurrent_atomic_transfers_across_two_keys(store: Store) -> None:
    await store.create("usage/instances", Counter(value=0))
    await store.create("usage/cores", Counter(value=0))

    async def claim(txn: Txn) -> int:
        instances = await txn.get("usage/instances", Counter)
        cores = await txn.get("usage/cores", Counter)
        assert instances is not None and cores is not None
        txn.put("usage/instances", Counter(value=instances.value.value + 1))
        txn.put("usage/cores", Counter(value=cores.value.value + 2))
        return instances.value.value

    seen = await asyncio.gather(*(store.atomic(claim, retries=64) for _ in range(20)))
    assert sorted(seen) == list(range(20))
    assert (await store.get("usage/instances", Counter)).value.value == 20
    assert (await store.get("usage/cores", Counter)).value.value == 40


async def test_twenty_concurrent_creates_exactly_one_wins(store: Store) -> None:
    outcomes = await asyncio.gather(
        *(store.create("ipam/net-1/10.0.0.5", Text(value=f"port-{i}")) for i in range(20)),
        return_exceptions=True,
    )
    winners = [o for o in outcomes if isinstance(o, Versioned)]
    losers = [o for o in outcomes if isinstance(o, errors.AlreadyExists)]
    assert len(winners) == 1 and len(losers) == 19
    assert (await store.get("ipam/net-1/10.0.0.5", Text)).value == winners[0].value


async def test_atomic_create_of_existing_key_is_already_exists(store: Store) -> None:
    await store.create("requests/p1/r1", Text(value="first"))

    async def body(txn: Txn) -> None:
        txn.create("requests/p1/r1", Text(value="second"))
        txn.put("compute/instances/i2", Text(value="i2"))

    with pytest.raises(errors.AlreadyExists):
        await store.atomic(body)
    assert await store.find("compute/instances/i2", Text) is None
    assert (await store.get("requests/p1/r1", Text)).value.value == "first"


async def test_atomic_reads_its_own_writes_and_deletes(store: Store) -> None:
    await store.create("a", Counter(value=1))

    async def body(txn: Txn) -> tuple[int, bool]:
        txn.put("b", Counter(value=7))
        txn.delete("a")
        b = await txn.get("b", Counter)
        return (b.value.value if b else -1), (await txn.get("a", Counter)) is None

    assert await store.atomic(body) == (7, True)
    assert await store.find("a", Counter) is None
    assert (await store.get("b", Counter)).value.value == 7


async def test_a_stale_assumption_is_decided_again_even_by_a_run_that_writes_nothing(
        store: Store) -> None:
    """A body that takes a key as known (`Txn.assume`, as a watch cache or a replica's last
    commit held it) runs again on the key's real value when the assumption was stale, also
    when what it decided from it was to write nothing."""
    await store.create("limit", Counter(value=5))
    seen: list[int] = []

    async def body(txn: Txn) -> str:
        txn.assume("limit", Counter(value=0), 1)  # stale: it was created later than that
        found = await txn.get("limit", Counter)
        limit = found.value.value if found else 0
        seen.append(limit)
        if limit == 0:
            return "refused"  # no write: nothing would have compared the assumption
        txn.put("used", Counter(value=1))
        return "written"

    assert await store.atomic(body) == "written"
    assert seen == [0, 5]

    current = await store.get("limit", Counter)

    async def right(txn: Txn) -> int:
        txn.assume("limit", current.value, current.mod_revision)  # what etcd holds: one run
        found = await txn.get("limit", Counter)
        seen.append(found.value.value if found else 0)
        return seen[-1]

    assert await store.atomic(right) == 5 and seen == [0, 5, 5]


async def test_atomic_gives_up_with_conflict(store: Store) -> None:
    await store.create("hot", Counter(value=0))

    async def body(txn: Txn) -> None:
        hot = await txn.get("hot", Counter)
        assert hot is not None
        # Someone else writes the key between our read and our commit, every time.
        await store.update("hot", Counter, increment)
        txn.put("hot", Counter(value=hot.value.value + 100))

    with pytest.raises(errors.Conflict):
        await store.atomic(body, retries=2)
    assert (await store.get("hot", Counter)).value.value == 3


async def test_key_with_lease_vanishes_when_revoked(store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.create("nodes/n1", Text(value="n1"), lease=lease)
    await store.update("nodes/n1", Text, lambda t: Text(value="n1 updated"))
    await store.revoke_lease(lease)
    assert await store.find("nodes/n1", Text) is None
    await store.revoke_lease(lease)  # revoking twice is harmless
    with pytest.raises(errors.NotFound):
        await store.refresh_lease(lease)


async def test_reads_name_the_lease_a_key_is_attached_to(store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.create("nodes/leased", Text(value="a"), lease=lease)
    await store.create("plain", Text(value="b"))
    found = await store.find("nodes/leased", Text)
    assert found is not None and found.lease == lease.id
    seen: list[int] = []

    async def body(txn: Txn) -> None:
        for key in ("nodes/leased", "plain"):
            item = await txn.get(key, Text)
            assert item is not None
            seen.append(item.lease)

    await store.atomic(body)
    assert seen == [lease.id, 0]
    await store.revoke_lease(lease)


async def _gone_within(store: Store, key: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await store.find(key, Text) is None:
            return True
        await asyncio.sleep(0.2)
    return False


async def test_key_with_lease_expires_and_keep_alive_keeps_it(store: Store) -> None:
    kept, dropped = await store.grant_lease(2), await store.grant_lease(2)
    await store.create("nodes/kept", Text(value="kept"), lease=kept)
    await store.create("nodes/dropped", Text(value="dropped"), lease=dropped)
    task = store.keep_alive(kept)
    try:
        assert await _gone_within(store, "nodes/dropped", 6)
        await asyncio.sleep(3)  # well past the 2 s ttl
        assert await store.find("nodes/kept", Text) is not None
    finally:
        task.cancel()
    assert await _gone_within(store, "nodes/kept", 6)
    with pytest.raises(errors.InvalidArgument):
        await store.grant_lease(0)
    with pytest.raises(errors.InvalidArgument):
        await store.refresh_lease("lease")  # type: ignore[arg-type]


async def test_atomic_put_keeps_the_lease_of_a_key_it_read(store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.create("nodes/n1", Text(value="n1"), lease=lease)

    async def body(txn: Txn) -> None:
        await txn.get("nodes/n1", Text)
        txn.put("nodes/n1", Text(value="n1 v2"))

    await store.atomic(body)
    await store.revoke_lease(lease)
    assert await store.find("nodes/n1", Text) is None


async def test_lease_object_round_trips(store: Store) -> None:
    lease = await store.grant_lease(10)
    assert isinstance(lease, Lease) and lease.id > 0 and lease.ttl == 10
    await store.refresh_lease(lease)
    await store.revoke_lease(lease)


async def test_a_mirror_reads_what_list_all_reads_by_what_changed(store: Store) -> None:
    """A mirror's read answers the values `list_all` answers, at a revision no older than
    the store's when it was called, through creates, updates, deletes and a key deleted
    and made again; reads at once all see the write made before them."""
    mirror = store.mirror("mirrored/", Counter)

    async def same() -> None:
        read, revision = await mirror.read()
        listed, now = await store.list_all("mirrored/", Counter)
        assert revision == now  # nothing writes between the two reads
        assert [(i.key, i.value.value, i.mod_revision) for i in read] == [
            (i.key, i.value.value, i.mod_revision) for i in listed]

    await same()  # empty
    for n in range(5):
        await store.create(f"mirrored/{n}", Counter(value=n))
    await same()
    await store.update("mirrored/2", Counter, increment)
    await same()
    await store.delete("mirrored/0")
    await same()
    await store.delete("mirrored/3")
    await store.create("mirrored/3", Counter(value=30))  # the same count, a new key
    await same()
    await store.delete("mirrored/4")
    await store.create("mirrored/9", Counter(value=9))  # one gone, one new: the same count
    await same()
    await store.create("mirrored-not/1", Counter(value=1))  # beside the prefix: not in it
    await same()

    async def write_then_read(n: int) -> set[str]:
        await store.create(f"mirrored/x{n}", Counter(value=n))
        read, _ = await mirror.read()
        return {item.key for item in read}

    seen = await asyncio.gather(*(write_then_read(n) for n in range(10)))
    for n, keys_read in enumerate(seen):
        assert f"mirrored/x{n}" in keys_read
    await same()
    with pytest.raises(TypeError):
        store.mirror("mirrored/", Text)
