"""Store watches and paginated listings against a real etcd, while writers keep writing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from services.client.lab import daemons
from services.common import errors
from services.common.store import Store, Txn, WatchEvent

Counter = wrappers_pb2.Int64Value


async def collect(
    events: AsyncIterator[WatchEvent[Counter]], count: int, wait: float = 10
) -> list[tuple[str, str, int | None, int]]:
    """The first `count` events as (type, key, value, revision)."""
    seen: list[tuple[str, str, int | None, int]] = []

    async def read() -> None:
        async for event in events:
            seen.append((event.type, event.key,
                         None if event.value is None else event.value.value,
                         event.mod_revision))
            if len(seen) == count:
                return

    await asyncio.wait_for(read(), wait)
    return seen


async def write_history(store: Store) -> list[tuple[str, str, int | None]]:
    """A mix of creates, updates, deletes and one two-key transaction; what a watch must see."""
    await store.create("w/a", Counter(value=1))
    await store.create("w/b", Counter(value=2))
    await store.update("w/a", Counter, lambda c: Counter(value=c.value + 10))
    await store.delete("w/b")
    await store.create("other/x", Counter(value=99))  # outside the watched prefix

    async def both(txn: Txn) -> None:
        txn.put("w/c", Counter(value=3))
        txn.delete("w/a")

    await store.atomic(both)
    await store.create("w/b", Counter(value=4))
    return [
        ("put", "w/a", 1), ("put", "w/b", 2), ("put", "w/a", 11), ("delete", "w/b", None),
        ("put", "w/c", 3), ("delete", "w/a", None), ("put", "w/b", 4),
    ]


async def test_watch_from_a_revision_sees_every_later_change_in_order(store: Store) -> None:
    await store.create("w/before", Counter(value=0))
    start = await store.revision() + 1
    expected = await write_history(store)
    events = await collect(store.watch("w/", Counter, start_revision=start), len(expected))
    assert [e[:3] for e in events] == expected
    revisions = [e[3] for e in events]
    assert revisions == sorted(revisions) and revisions[0] >= start
    # Events of one transaction share its revision; nothing else does.
    assert len(set(revisions)) == len(revisions) - 1


async def test_watch_started_before_writes_sees_them_live_and_nothing_twice(
    store: Store,
) -> None:
    start = await store.revision() + 1
    stream = store.watch("w/", Counter, start_revision=start)
    reader = asyncio.create_task(collect(stream, 7))
    await asyncio.sleep(0.2)
    expected = await write_history(store)
    events = await reader
    assert [e[:3] for e in events] == expected
    # Nothing more arrives: no event is delivered twice.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(aiter(stream)), 1.0)


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[str]:
    """An etcd of our own: compacting the shared one would disturb other tests."""
    port, peer = daemons.free_port(), daemons.free_port()
    daemon = daemons.start_etcd(tmp_path / "etcd", port, peer)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        daemon.stop()


async def test_watch_from_a_compacted_revision_fails_precondition(private_etcd: str) -> None:
    store = await Store.connect([private_etcd], root="/compaction")
    try:
        first = await store.create("w/a", Counter(value=1))
        for _ in range(5):
            await store.update("w/a", Counter, lambda c: Counter(value=c.value + 1))
        await store.compact(await store.revision())
        with pytest.raises(errors.FailedPrecondition) as caught:
            await collect(store.watch("w/", Counter, start_revision=first.mod_revision), 1)
        assert caught.value.reason == "nubis.store.compacted"
    finally:
        await store.close()


async def _seed(store: Store, count: int) -> None:
    for chunk in range(0, count, 100):
        await asyncio.gather(*(
            store.create(f"items/{i:05d}", Counter(value=i))
            for i in range(chunk, min(chunk + 100, count))
        ))


async def test_pages_of_37_return_each_key_once_while_writers_write(store: Store) -> None:
    await _seed(store, 1000)
    stop = asyncio.Event()
    writes = 0

    async def writer() -> None:
        nonlocal writes
        n = 0
        while not stop.is_set():
            await store.update(f"items/{(n * 7) % 1000:05d}", Counter,
                               lambda c: Counter(value=c.value + 100_000))
            await store.create(f"items/{1000 + n:05d}", Counter(value=-1))  # after the cursor
            await store.create(f"itemz/{n:05d}", Counter(value=-1))  # outside the prefix
            n += 1
            writes += 3

    writing = asyncio.create_task(writer())
    keys: list[str] = []
    values: list[int] = []
    token, revisions, pages = "", set(), 0
    try:
        while True:
            page = await store.list("items/", Counter, page_size=37, page_token=token)
            pages += 1
            keys += [item.key for item in page.items]
            values += [item.value.value for item in page.items]
            revisions.add(page.revision)
            token = page.next_page_token
            await asyncio.sleep(0.005)  # let the writer move things between pages
            if not token:
                break
    finally:
        stop.set()
        await writing
    assert writes > 0
    assert keys == [f"items/{i:05d}" for i in range(1000)]
    # The listing is one snapshot: no update made during it shows, no key added shows.
    assert values == list(range(1000))
    assert pages == 28 and len(revisions) == 1
    everything, revision = await store.list_all("items/", Counter)
    assert len(everything) >= 1000 + writes // 3 and revision > revisions.pop()


async def test_listing_is_stable_and_ordered_by_key(store: Store) -> None:
    for name in ["b", "a", "c/1", "c/0", "ab"]:
        await store.create(f"x/{name}", Counter(value=1))
    first = [v.key for v in (await store.list("x/", Counter, page_size=100)).items]
    again = [v.key for v in (await store.list("x/", Counter, page_size=2)).items]
    assert first == ["x/a", "x/ab", "x/b", "x/c/0", "x/c/1"]
    assert again == first[:2]
    empty = await store.list("nothing/", Counter)
    assert empty.items == [] and empty.next_page_token == "" and empty.revision > 0


async def test_listing_survives_compaction_of_its_snapshot(private_etcd: str) -> None:
    store = await Store.connect([private_etcd], root="/paging")
    try:
        await _seed(store, 10)
        page = await store.list("items/", Counter, page_size=4)
        for i in range(3):
            await store.update(f"items/{i:05d}", Counter, lambda c: Counter(value=-1))
        await store.compact(await store.revision())
        keys = [v.key for v in page.items]
        token = page.next_page_token
        while token:
            page = await store.list("items/", Counter, page_size=4, page_token=token)
            keys += [v.key for v in page.items]
            token = page.next_page_token
        assert keys == [f"items/{i:05d}" for i in range(10)]
    finally:
        with contextlib.suppress(errors.NubisError):
            await store.close()
