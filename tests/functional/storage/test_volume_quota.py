"""Quota: volumes and volume_gb reserved with the record, released when the volume is gone."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import field_mask_pb2
from nubis.identity.v1 import identity_pb2
from nubis.storage.v1 import volume_pb2

from tests.functional.storage.test_volumes import new_volume
from tests.functional.storage.volume_harness import VolumeCloud, wait_gone, wait_state

Volume = volume_pb2.Volume


async def test_20_concurrent_creates_against_a_quota_of_10_volumes(cloud: VolumeCloud) -> None:
    project, member = await cloud.member_of_new_project("quota")
    await cloud.identity_stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project, limits={"volumes": 10}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.volumes"])), metadata=cloud.admin)
    stub = cloud.stub()
    results = await asyncio.gather(*(stub.CreateVolume(new_volume(f"q{i}", 1), metadata=member)
                                     for i in range(20)), return_exceptions=True)
    made = [r for r in results if isinstance(r, Volume)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(made) == 10 and len(refused) == 10
    assert {exc.code() for exc in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    listed = await stub.ListVolumes(volume_pb2.ListVolumesRequest(), metadata=member)
    assert len(listed.volumes) == 10

    usage = await cloud.identity_stub.GetUsage(identity_pb2.GetUsageRequest(project_id=project),
                                               metadata=cloud.admin)
    assert usage.in_use["volumes"] == 10 and usage.in_use["volume_gb"] == 10
    for volume in made:
        await wait_state(stub, volume.meta.id, member, {Volume.AVAILABLE})
    await stub.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made[0].meta.id), metadata=member)
    await wait_gone(stub, made[0].meta.id, member)
    usage = await cloud.identity_stub.GetUsage(identity_pb2.GetUsageRequest(project_id=project),
                                               metadata=cloud.admin)
    assert usage.in_use["volumes"] == 9 and usage.in_use["volume_gb"] == 9
