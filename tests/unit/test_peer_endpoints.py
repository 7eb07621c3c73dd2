"""The peers client's endpoint cache: a slow or briefly empty catalog is no "no endpoint"."""

from __future__ import annotations

import asyncio

import pytest

from services.client.peers.endpoints import NO_ENDPOINT, EndpointDirectory
from services.common import errors


class Catalog:
    """Identity's answers, as the test sets them; counts the asks."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.asked = 0
        self.delay = 0.0

    async def fetch(self, name: str) -> list[str]:
        self.asked += 1
        await asyncio.sleep(self.delay)
        return list(self.addresses)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def directory(catalog: Catalog, clock: Clock) -> EndpointDirectory:
    return EndpointDirectory(catalog.fetch, fixed={}, max_age=10.0, suspect_seconds=2.0,
                             clock=clock)


async def test_an_unknown_service_waits_for_the_catalog_and_none_listed_is_unavailable() -> None:
    catalog, clock = Catalog("a:1", "b:1"), Clock()
    found = directory(catalog, clock)
    assert {await found.pick("compute"), await found.pick("compute")} == {"a:1", "b:1"}
    assert catalog.asked == 1
    empty = directory(Catalog(), clock)
    with pytest.raises(errors.Unavailable) as caught:
        await empty.pick("compute")
    assert caught.value.reason == NO_ENDPOINT


async def test_an_old_list_is_used_while_a_slow_refresh_runs() -> None:
    catalog, clock = Catalog("a:1"), Clock()
    found = directory(catalog, clock)
    await found.pick("network")
    catalog.delay, catalog.addresses = 0.2, ["a:1", "c:1"]
    clock.now += 11  # older than max_age
    picks = await asyncio.wait_for(asyncio.gather(*(found.pick("network") for _ in range(5))),
                                   timeout=0.1)
    assert set(picks) == {"a:1"}
    assert catalog.asked == 2  # one refresh for all of them, in the background
    await asyncio.sleep(0.3)
    assert {await found.pick("network"), await found.pick("network")} == {"a:1", "c:1"}


async def test_a_briefly_empty_catalog_keeps_the_known_addresses_for_max_age() -> None:
    catalog, clock = Catalog("a:1"), Clock()
    found = directory(catalog, clock)
    await found.pick("storage")
    catalog.addresses = []
    found.failed("storage", "a:1")  # a call failed: refresh, which lists none
    assert await found.pick("storage") == "a:1"
    await asyncio.sleep(0.02)
    assert catalog.asked == 2 and await found.pick("storage") == "a:1"
    clock.now += 11  # empty for longer than max_age: the service is gone
    await found.pick("storage")
    await asyncio.sleep(0.02)
    with pytest.raises(errors.Unavailable):
        await found.pick("storage")
