"""Bounded lease growth: request-id records and revocations share time-bucketed leases.

However many creates carry a request_id and however many tokens are revoked,
the leases etcd holds grow by a handful (one per bucket in use), not by one
per record; every record still lives at least as long as it must, and a
shared lease lost under a writer is granted again.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from nubis.common.v1 import request_pb2
from nubis.identity.v1 import identity_pb2

from services.common import requests
from services.common.context import Principal, ProjectId, UserId
from services.common.store import Store, Txn
from services.identity import keys, project, revocation

CLOUD_ADMIN = Principal(UserId("op"), "op", ProjectId(""), frozenset({"cloud-admin"}))
RECORDS = 60


async def _project(store: Store, request_id: str) -> str:
    request = identity_pb2.CreateProjectRequest(request_id=request_id)
    request.project.meta.name = f"p-{uuid.uuid4().hex[:10]}"
    return (await project.create(store, CLOUD_ADMIN, request)).meta.id


async def _new_leases(store: Store, before: set[int]) -> set[int]:
    return set(await store.leases()) - before


async def test_request_records_share_a_few_leases(store: Store) -> None:
    before = set(await store.leases())
    await asyncio.gather(*(_project(store, f"req-{i}-{uuid.uuid4().hex}")
                           for i in range(RECORDS)))
    records, _ = await store.list_all(requests.PREFIX, request_pb2.RequestRecord)
    assert len(records) == RECORDS
    # One bucket's lease (two if the hour turned meanwhile), not one per record.
    assert len(await _new_leases(store, before)) <= 2
    item = await store.find(records[0].key, request_pb2.RequestRecord)
    assert item is not None and item.lease
    left = await store.lease_time_to_live(item.lease)
    assert requests.TTL_SECONDS - 60 <= left <= requests.TTL_SECONDS + \
        requests.LEASE_BUCKET_SECONDS + 60


async def test_revocations_share_a_few_leases(store: Store) -> None:
    token_ttl = 3600
    before = set(await store.leases())
    now = time.time()
    # Tokens expiring anywhere in the next hour, as a day of revocations would.
    expiries = [now + token_ttl * i / RECORDS for i in range(1, RECORDS + 1)]
    await asyncio.gather(*(revocation.revoke_token(store, str(uuid.uuid4()), at)
                           for at in expiries))
    revoked, _ = await store.list_all(keys.REVOKED, identity_pb2.RevokedToken)
    assert len(revoked) == RECORDS
    # An hour of deadlines spans at most this many buckets (one more at the edges).
    bound = token_ttl // 300 + 2
    assert len(await _new_leases(store, before)) <= bound

    async def body(txn: Txn) -> None:
        for _ in range(RECORDS):
            await revocation.revoke_subject(store, txn, "user", str(uuid.uuid4()),
                                            token_ttl=token_ttl, project_id=str(uuid.uuid4()))

    await store.atomic(body)
    # Subjects revoked now end with the longest tokens: buckets already in use.
    assert len(await _new_leases(store, before)) <= bound + 1


async def test_each_revocation_outlives_its_token(store: Store) -> None:
    expires_at = time.time() + 120
    token_id = str(uuid.uuid4())
    await revocation.revoke_token(store, token_id, expires_at)
    entry = await store.find(keys.revoked(token_id), identity_pb2.RevokedToken)
    assert entry is not None
    left = await store.lease_time_to_live(entry.lease)
    assert expires_at - time.time() < left <= 120 + 60 + revocation.BUCKET_SECONDS + 10


async def test_a_lost_shared_lease_is_granted_again(store: Store) -> None:
    first = await _project(store, f"before-{uuid.uuid4().hex}")
    records, _ = await store.list_all(requests.PREFIX, request_pb2.RequestRecord)
    lost = (await store.find(records[0].key, request_pb2.RequestRecord))
    assert lost is not None and lost.lease
    await store.revoke_lease(await store.shared_lease(time.time() + requests.TTL_SECONDS,
                                                      width=requests.LEASE_BUCKET_SECONDS))
    assert await store.find(records[0].key, request_pb2.RequestRecord) is None

    second = await _project(store, f"after-{uuid.uuid4().hex}")
    assert second != first
    again, _ = await store.list_all(requests.PREFIX, request_pb2.RequestRecord)
    assert len(again) == 1
    fresh = await store.find(again[0].key, request_pb2.RequestRecord)
    assert fresh is not None and fresh.lease not in (0, lost.lease)
    assert await store.lease_time_to_live(fresh.lease) > requests.TTL_SECONDS - 60
