"""The supervised informers (scheduler node cache, token verifier) against a real etcd.

A crash is logged and restarted and the informer keeps working; an undecodable
record is skipped and logged without a re-list storm; a watch broken by an
outage resumes from its revision without re-listing, unless etcd compacted
that revision meanwhile, which re-lists; deleted-node tombstones are pruned.
The outage is one client's: it reaches etcd through a proxy the test cuts,
while the test keeps writing to (and compacting) etcd directly.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import wrappers_pb2
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client.lab import daemons
from services.common import auth, errors, supervise
from services.common.settings import SchedulerSettings
from services.common.store import Store, Versioned
from services.scheduler import cache as cache_module
from services.scheduler import keys
from tests.functional import scheduler_harness as harness
from tests.functional.tcp_proxy import TcpProxy

KID = "informer-test-kid"
QUICK = supervise.RestartPolicy(first_delay=0.05, max_delay=0.5, give_up_after=0)
# Bytes that are no message of ours: field 1 holds invalid UTF-8 for a string.
GARBLED = wrappers_pb2.BytesValue(value=b"\xff\xfe")


@pytest.fixture(scope="module")
def own_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """An etcd of this module's own (its client port): the tests compact it."""
    base = tmp_path_factory.mktemp("informer-etcd")
    daemon = daemons.start_etcd(base / "data", daemons.free_port(), daemons.free_port())
    try:
        yield daemon.ports[0]
    finally:
        daemon.stop()


@dataclass
class Outage:
    """A store behind a proxy (the informer's) and one reaching etcd directly (the test's)."""

    proxy: TcpProxy
    behind: Store
    direct: Store


@pytest.fixture
async def outage(own_etcd: int) -> AsyncIterator[Outage]:
    prefix = f"/informer-{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy(own_etcd)
    await proxy.start()
    behind = await Store.connect([proxy.endpoint], root=prefix, timeout=1.0)
    direct = await Store.connect([f"127.0.0.1:{own_etcd}"], root=prefix)
    try:
        yield Outage(proxy, behind, direct)
    finally:
        await proxy.cut()
        await behind.close()
        await direct.close()


@pytest.fixture
async def running_cache() -> AsyncIterator[list[asyncio.Task[None]]]:
    """Tasks to cancel at the end of a test (the informers it started)."""
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def start_cache(store: Store, tasks: list[asyncio.Task[None]], *,
                      tombstone_seconds: float = cache_module.TOMBSTONE_SECONDS,
                      ) -> cache_module.NodeCache:
    node_cache = cache_module.NodeCache(store, SchedulerSettings(), restart_policy=QUICK,
                                        tombstone_seconds=tombstone_seconds)
    tasks.append(asyncio.create_task(node_cache.run()))
    await asyncio.wait_for(node_cache.synced.wait(), 10)
    return node_cache


async def until(predicate: Callable[[], object], within: float = 15.0) -> None:
    async def check() -> bool:
        return bool(predicate())

    await harness.wait_for(check, within)


def vcpus_of(node_cache: cache_module.NodeCache, name: str) -> int | None:
    report = node_cache.report(name)
    return report.capacity.vcpus if report is not None else None


async def test_a_crashing_informer_is_logged_restarted_and_keeps_working(
    store: Store, running_cache: list[asyncio.Task[None]],
) -> None:
    node_cache = await start_cache(store, running_cache)
    with structlog.testing.capture_logs() as logs:
        # A record this code cannot use (the API never accepts an infinite ratio).
        poison = scheduler_pb2.NodeSettings(
            name="poison", allocation_ratios=scheduler_pb2.AllocationRatios(cpu=math.inf))
        await store.create(keys.node_settings("poison"), poison)
        await until(lambda: node_cache.supervision.crashes >= 1)
        await store.delete(keys.node_settings("poison"))
        await harness.put_node(store, harness.report("after", vcpus=12))
        await until(lambda: vcpus_of(node_cache, "after") == 12)
    assert not running_cache[0].done()
    crashed = [e for e in logs if e["event"] == "background loop crashed; restarting"]
    assert crashed and crashed[0]["loop"] == "node-informer"
    assert crashed[0]["exc_info"] is not None
    assert node_cache.view("poison") is None


async def test_an_undecodable_node_record_is_skipped_without_a_relist_storm(
    store: Store, running_cache: list[asyncio.Task[None]],
) -> None:
    await store.create(keys.node_report("garbled-1"), GARBLED)
    await harness.put_node(store, harness.report("n1"))
    with structlog.testing.capture_logs() as logs:
        node_cache = await start_cache(store, running_cache)
        assert node_cache.view("n1") is not None and node_cache.view("garbled-1") is None
        listed = node_cache.listings
        # One arriving by watch, over a node the cache holds.
        await store.create(keys.node_report("garbled-2"), GARBLED)
        await harness.put_node(store, harness.report("n1", vcpus=3))
        await store.replace(keys.node_report("n1"), GARBLED,
                            expect_revision=(await store.get(keys.node_report("n1"),
                                                             scheduler_pb2.NodeReport)).mod_revision)
        await harness.put_node(store, harness.report("n2"))
        await until(lambda: node_cache.view("n2") is not None)
        await asyncio.sleep(1.0)  # time for a storm of re-lists, if there were one
    assert node_cache.listings == listed == 1
    assert node_cache.undecodable == 3
    assert node_cache.supervision.crashes == 0
    assert node_cache.report("n1") is None  # its unreadable record counts as absent
    skipped = [e for e in logs if e["event"] == "undecodable node record skipped"]
    assert {e["key"] for e in skipped} == {"nodes/garbled-1", "nodes/garbled-2", "nodes/n1"}


async def test_a_broken_watch_resumes_from_its_revision_without_relisting(
    outage: Outage, running_cache: list[asyncio.Task[None]],
) -> None:
    await harness.put_node(outage.direct, harness.report("kept", vcpus=4))
    node_cache = await start_cache(outage.behind, running_cache)
    listed = node_cache.listings
    await outage.proxy.cut()
    await until(lambda: node_cache.supervision.transient_failures >= 1)
    await harness.put_node(outage.direct, harness.report("kept", vcpus=6))
    await harness.put_node(outage.direct, harness.report("joined"))
    await outage.proxy.restore()
    await until(lambda: vcpus_of(node_cache, "kept") == 6 and node_cache.view("joined"))
    assert node_cache.listings == listed
    assert node_cache.supervision.crashes == 0


async def test_a_compaction_during_an_outage_makes_the_cache_relist(
    outage: Outage, running_cache: list[asyncio.Task[None]],
) -> None:
    await harness.put_node(outage.direct, harness.report("kept", vcpus=4))
    await harness.put_node(outage.direct, harness.report("leaving"))
    node_cache = await start_cache(outage.behind, running_cache)
    assert node_cache.view("leaving") is not None
    listed = node_cache.listings
    await outage.proxy.cut()
    await until(lambda: node_cache.supervision.transient_failures >= 1)
    # While the cache hears nothing: a node joins, one leaves, one grows, and
    # etcd compacts its history past all of it (and past the cache's revision).
    await harness.put_node(outage.direct, harness.report("joined"))
    await outage.direct.delete(keys.node_report("leaving"))
    await harness.put_node(outage.direct, harness.report("kept", vcpus=32))
    await outage.direct.compact(await outage.direct.revision())
    with structlog.testing.capture_logs() as logs:
        await outage.proxy.restore()
        await until(lambda: node_cache.listings > listed)
    assert vcpus_of(node_cache, "kept") == 32
    assert node_cache.view("joined") is not None
    assert node_cache.view("leaving") is None
    assert node_cache.listings == listed + 1
    assert node_cache.supervision.crashes == 0
    assert any(e["event"] == "node watch resumed past compacted history; re-listing"
               for e in logs)


async def test_deleted_node_tombstones_are_pruned(
    store: Store, running_cache: list[asyncio.Task[None]],
) -> None:
    node_cache = await start_cache(store, running_cache, tombstone_seconds=2.0)
    for index in range(20):
        await harness.put_node(store, harness.report(f"short-{index}"))
        await store.delete(keys.node_report(f"short-{index}"))
    await until(lambda: node_cache.tombstones() == 20)
    # Within its time a tombstone still refuses a late read made before the delete.
    await harness.put_node(store, harness.report("late"))
    before = await store.get(keys.node_report("late"), scheduler_pb2.NodeReport)
    await store.delete(keys.node_report("late"))
    await until(lambda: node_cache.view("late") is None)
    node_cache.observe_report("late", Versioned(before.key, before.value, before.mod_revision,
                                                before.create_revision))
    assert node_cache.view("late") is None
    await asyncio.sleep(2.1)  # every tombstone ages past its time
    await harness.put_node(store, harness.report("last"))
    await store.delete(keys.node_report("last"))
    await until(lambda: node_cache.view("last") is None and node_cache.tombstones() == 1)


# -- the token verifier ------------------------------------------------------


@pytest.fixture
async def signer_behind(outage: Outage) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    await outage.direct.create(
        f"{auth.KEYS_PREFIX}{KID}",
        identity_pb2.SigningKey(kid=KID, algorithm="EdDSA", public_key_pem=public_pem(key)))
    return key


async def revoke(store: Store, token_id: str) -> None:
    await store.create(f"{auth.REVOKED_PREFIX}{token_id}",
                       identity_pb2.RevokedToken(token_id=token_id))


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signed_token(key: Ed25519PrivateKey) -> str:
    now = time.time()
    claims = {"iss": auth.ISSUER, "sub": "user-1", "project": "proj-1", "roles": ["member"],
              "jti": str(uuid.uuid4()), "iat": now, "exp": int(now) + 600}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": KID})


def token_id(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def refused(verifier: auth.TokenVerifier, token: str) -> None:
    def is_refused() -> bool:
        try:
            verifier.verify(token)
        except errors.Unauthenticated:
            return True
        return False

    await until(is_refused)


async def test_verifier_skips_an_undecodable_revocation_and_applies_later_ones(
    outage: Outage, signer_behind: Ed25519PrivateKey,
) -> None:
    verifier = auth.TokenVerifier(outage.direct, restart_policy=QUICK)
    await outage.direct.create(f"{auth.REVOKED_PREFIX}garbled-1", GARBLED)
    with structlog.testing.capture_logs() as logs:
        await verifier.start()
        try:
            listed = verifier.listings
            token = signed_token(signer_behind)
            await outage.direct.create(f"{auth.REVOKED_PREFIX}garbled-2", GARBLED)
            await revoke(outage.direct, token_id(token))
            await refused(verifier, token)
            await asyncio.sleep(1.0)  # time for a storm of re-lists, if there were one
            assert verifier.listings == listed == 3
            assert verifier.undecodable == 2
        finally:
            await verifier.stop()
    assert len([e for e in logs if e["event"] == "auth.record_undecodable"]) == 2


async def test_verifier_relists_after_a_compaction_during_an_outage(
    outage: Outage, signer_behind: Ed25519PrivateKey,
) -> None:
    verifier = auth.TokenVerifier(outage.behind, restart_policy=QUICK)
    await verifier.start()
    try:
        first, second = (signed_token(signer_behind) for _ in range(2))
        listed = verifier.listings
        await outage.proxy.cut()
        await revoke(outage.direct, token_id(first))
        await outage.proxy.restore()
        await refused(verifier, first)
        assert verifier.listings == listed  # a broken watch resumes

        await outage.proxy.cut()
        await revoke(outage.direct, token_id(second))
        # One more write, so that the compaction also passes the revocation's revision.
        await outage.direct.create("identity/unrelated", identity_pb2.RevokedToken())
        await outage.direct.compact(await outage.direct.revision())
        await outage.proxy.restore()
        await refused(verifier, second)
        # Each of the three prefixes resumed from a compacted revision and re-listed once.
        await until(lambda: verifier.listings == listed + 3)
        await asyncio.sleep(0.5)
        assert verifier.listings == listed + 3
    finally:
        await verifier.stop()
