"""The cloud's quota defaults are one record in etcd: replicas with other settings agree.

Bootstrap seeds the record from its settings; two identity replicas started with
different defaults in their own settings then report and enforce the same
limits, and a change made through one is what the other (and every
reservation) uses at once.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import make_channel
from services.common import errors, quota
from services.common.settings import QuotaSettings, Settings
from services.common.store import Store, Txn
from services.identity import main, manage
from tests.conftest import EtcdEndpoint
from tests.functional.authz.world import (
    ADMIN_PASSWORD,
    Service,
    service_settings,
    start_service,
    write_key,
)

if TYPE_CHECKING:  # the async stub type exists only in the generated type stubs
    Stub = identity_pb2_grpc.IdentityServiceAsyncStub


def _with_defaults(settings: Settings, networks: int) -> Settings:
    return settings.model_copy(update={"quota": QuotaSettings(defaults={"networks": networks,
                                                                         "ports": 40})})


@pytest.fixture
async def replicas(etcd: EtcdEndpoint, tmp_path_factory: pytest.TempPathFactory
                   ) -> AsyncIterator[tuple[Store, list[Stub], str]]:
    """Bootstrap with networks=3, then two replicas configured with 3 and 7; an admin token."""
    key_file = tmp_path_factory.mktemp("quota-defaults") / "signing.pem"
    write_key(key_file)
    base = service_settings(etcd.endpoint, f"/test-quota-defaults-{uuid.uuid4().hex[:8]}",
                            key_file)
    await manage._bootstrap(_with_defaults(base, 3), ADMIN_PASSWORD)
    store = await Store.connect([etcd.endpoint], root=base.etcd.prefix)
    services: list[Service] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for networks in (3, 7):
            service = await start_service(main.build, store, _with_defaults(base, networks),
                                          base.identity)
            services.append(service)
            channels.append(make_channel(service.running.address))
        stubs = [identity_pb2_grpc.IdentityServiceStub(channel) for channel in channels]
        login = await stubs[1].Authenticate(identity_pb2.AuthenticateRequest(
            username="admin", password=ADMIN_PASSWORD, project=base.auth.admin_project))
        yield store, stubs, login.token
    finally:
        for channel in channels:
            await channel.close()
        for service in services:
            await service.stop()
        await store.close()


async def _reserve_all(store: Store, project_id: str) -> int:
    """Networks one project can reserve until the quota refuses (the shared helper's limit)."""
    count = 0
    while True:
        async def body(txn: Txn) -> None:
            await quota.reserve(txn, project_id, {"networks": 1})
        try:
            await store.atomic(body)
        except errors.ResourceExhausted:
            return count
        count += 1


async def test_replicas_with_other_settings_enforce_the_same_limits(
    replicas: tuple[Store, list[Stub], str],
) -> None:
    store, stubs, token = replicas
    admin = (("authorization", f"Bearer {token}"),)
    seen = [await stub.GetQuota(identity_pb2.GetQuotaRequest(), metadata=admin)
            for stub in stubs]
    assert [reply.limits["networks"] for reply in seen] == [3, 3]
    assert seen[0].limits == seen[1].limits
    defaults = [await stub.GetDefaultQuota(identity_pb2.GetDefaultQuotaRequest(), metadata=admin)
                for stub in stubs]
    assert defaults[0] == defaults[1]
    assert defaults[0].limits["ports"] == 40
    # A resource the seed did not name keeps the built-in default.
    assert defaults[0].limits["routers"] == quota.BUILT_IN_DEFAULTS["routers"]
    assert await _reserve_all(store, str(uuid.uuid4())) == 3

    # A cloud-admin's change through one replica is the limit everywhere, at once.
    changed = await stubs[1].UpdateDefaultQuota(identity_pb2.UpdateDefaultQuotaRequest(
        quota=identity_pb2.Quota(limits={"networks": 5}, revision=defaults[0].revision),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.networks"])), metadata=admin)
    assert changed.limits["networks"] == 5
    assert (await stubs[0].GetQuota(identity_pb2.GetQuotaRequest(), metadata=admin)
            ).limits["networks"] == 5
    assert await _reserve_all(store, str(uuid.uuid4())) == 5


async def test_default_quota_updates_are_checked(replicas: tuple[Store, list[Stub], str]) -> None:
    _, stubs, token = replicas
    admin = (("authorization", f"Bearer {token}"),)
    current = await stubs[0].GetDefaultQuota(identity_pb2.GetDefaultQuotaRequest(),
                                             metadata=admin)
    cases = [
        (identity_pb2.Quota(limits={"networks": -2}), ["limits.networks"],
         grpc.StatusCode.INVALID_ARGUMENT),
        (identity_pb2.Quota(limits={"gpus": 1}), ["limits"], grpc.StatusCode.INVALID_ARGUMENT),
        (identity_pb2.Quota(project_id=str(uuid.uuid4())), ["limits.networks"],
         grpc.StatusCode.INVALID_ARGUMENT),
        (identity_pb2.Quota(limits={"networks": 1}, revision=current.revision + 1000),
         ["limits.networks"], grpc.StatusCode.ABORTED),
    ]
    for sent, mask, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs[0].UpdateDefaultQuota(identity_pb2.UpdateDefaultQuotaRequest(
                quota=sent, update_mask=field_mask_pb2.FieldMask(paths=mask)), metadata=admin)
        assert refused.value.code() == code, (sent, refused.value)
    # Reset: back to the built-in default.
    reset = await stubs[0].UpdateDefaultQuota(identity_pb2.UpdateDefaultQuotaRequest(
        update_mask=field_mask_pb2.FieldMask(paths=["limits.ports"])), metadata=admin)
    assert reset.limits["ports"] == quota.BUILT_IN_DEFAULTS["ports"]
    assert reset.limits["networks"] == current.limits["networks"]
