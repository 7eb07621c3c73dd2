"""CreateInstance's contract: request_id replays, validate_only, quota, named bad references,
and a delete while the build still runs."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.compute.v1 import instance_requests_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import network_pb2, port_pb2, security_group_pb2, subnet_pb2

from services.common import quota, requests
from services.compute import keys
from tests.functional.compute.harness import ComputeCloud, Instance, cloud
from tests.functional.storage.harness import reason_of

__all__ = ["cloud"]


async def _usage(cloud: ComputeCloud) -> dict[str, int]:
    return (await quota.in_use(cloud.base.store, cloud.project))[0]


async def test_a_retried_request_returns_the_same_instance(cloud: ComputeCloud) -> None:
    request_id = str(uuid.uuid4())
    shape = cloud.server("retried")
    made = await asyncio.gather(*(cloud.create(shape, request_id=request_id) for _ in range(3)))
    assert len({m.meta.id for m in made}) == 1
    again = await cloud.create(shape, request_id=request_id)
    assert again.meta.id == made[0].meta.id
    assert (await _usage(cloud)).get("instances") == 1
    await cloud.wait_final(again.meta.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # the key, for another request
        await cloud.create(cloud.server("other"), request_id=request_id)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(caught.value) == "nubis.request_id.reused"


async def test_validate_only_writes_nothing(cloud: ComputeCloud) -> None:
    before = await _usage(cloud)
    reply = await cloud.stub().CreateInstance(instance_requests_pb2.CreateInstanceRequest(
        instance=cloud.server("dry"), validate_only=True, request_id=str(uuid.uuid4())),
        metadata=cloud.admin)
    assert reply.state == Instance.BUILDING and reply.flavor.vcpus == 1
    assert await cloud.get(reply.meta.id) is None
    instances, _ = await cloud.base.store.list_all(keys.INSTANCES, Instance)
    assert not instances
    assert await _usage(cloud) == before


async def test_quota_exceeded_is_resource_exhausted(cloud: ComputeCloud) -> None:
    store = cloud.base.store
    found = await store.get(quota.quota_key(cloud.project), identity_pb2.Quota)
    found.value.limits["instances"] = 1
    await store.replace(found.key, found.value, expect_revision=found.mod_revision)
    first = await cloud.create()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.create()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(caught.value) == "nubis.quota.exceeded"
    await cloud.wait_final(first.meta.id)
    assert (await _usage(cloud))["instances"] == 1


async def test_bad_references_are_named(cloud: ComputeCloud) -> None:
    missing = str(uuid.uuid4())
    cases = [
        (cloud.server(flavor_id=missing), grpc.StatusCode.NOT_FOUND, "instance.flavor_id"),
        (cloud.server(image_id=missing), grpc.StatusCode.NOT_FOUND, "instance.image_id"),
        (cloud.server(flavor_id="nope"), grpc.StatusCode.INVALID_ARGUMENT,
         "instance.flavor_id"),
    ]
    with_net = cloud.server()
    with_net.networks[0].network_id = missing
    cases.append((with_net, grpc.StatusCode.NOT_FOUND, "instance.networks[0].network_id"))
    named = cloud.server()
    named.security_groups.append("web")
    cases.append((named, grpc.StatusCode.NOT_FOUND, "instance.security_groups[0]"))
    for shape, code, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cloud.create(shape)
        assert caught.value.code() == code, (field, caught.value.details())
        assert field in (caught.value.details() or ""), caught.value.details()
    assert not (await cloud.base.store.list_all(keys.INSTANCES, Instance))[0]


async def test_an_unknown_security_group_ends_the_build_in_error(cloud: ComputeCloud) -> None:
    shape = cloud.server()
    shape.security_groups.extend(["default", str(uuid.uuid4())])
    made = await cloud.create(shape)
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ERROR
    assert found.fault.message.startswith("build failed at allocate_network"), found.fault
    left = await cloud.wait_clean([found.meta.id])
    assert left.empty(), left


async def test_no_network_named_takes_the_projects_only_network(cloud: ComputeCloud) -> None:
    bare = cloud.server()
    del bare.networks[:]
    made = await cloud.create(bare)
    assert [nic.network_id for nic in made.networks] == [cloud.network_id]
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    assert [a.network_id for a in found.addresses] == [cloud.network_id]
    await cloud.network_stub().CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name="second"))),
        metadata=cloud.admin)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.create(bare)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.networks" in (caught.value.details() or "")
    assert "2 networks" in (caught.value.details() or ""), caught.value.details()


async def test_no_network_named_takes_the_one_shared_network(cloud: ComputeCloud) -> None:
    other = str(uuid.uuid4())  # a project with no network of its own
    await cloud.base.store.create(quota.quota_key(other), identity_pb2.Quota(
        project_id=other, limits={name: quota.UNLIMITED for name in quota.RESOURCES}))
    bare = cloud.server()
    del bare.networks[:]
    bare.meta.project_id = other
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.create(bare)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance.networks" in (caught.value.details() or "")
    net_stub = cloud.network_stub()
    shared = await net_stub.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=resource_pb2.ResourceMeta(name="shared"),
                                    shared=True)), metadata=cloud.admin)
    await net_stub.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        network_id=shared.meta.id, cidr="10.30.0.0/24")), metadata=cloud.admin)
    made = await cloud.create(bare)
    assert made.meta.project_id == other
    assert [nic.network_id for nic in made.networks] == [shared.meta.id]
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    assert [a.network_id for a in found.addresses] == [shared.meta.id]


async def test_a_security_group_named_by_name_is_the_projects(cloud: ComputeCloud) -> None:
    group = await cloud.network_stub().CreateSecurityGroup(
        security_group_pb2.CreateSecurityGroupRequest(security_group=security_group_pb2.
                                                      SecurityGroup(meta=resource_pb2.
                                                                    ResourceMeta(name="web"))),
        metadata=cloud.admin)
    shape = cloud.server()
    shape.security_groups.extend(["web", "default"])
    made = await cloud.create(shape)
    assert list(made.security_groups) == [group.meta.id]
    found = await cloud.wait_final(made.meta.id)
    assert found.state == Instance.ACTIVE, found.fault.message
    port = await cloud.network_stub().GetPort(port_pb2.GetPortRequest(id=found.port_ids[0]),
                                              metadata=cloud.admin)
    assert list(port.security_group_ids) == [group.meta.id]


async def test_delete_while_building_stops_the_build_and_leaks_nothing(
        cloud: ComputeCloud) -> None:
    made = await asyncio.gather(*(cloud.create() for _ in range(4)))
    await asyncio.sleep(0.2)
    await asyncio.gather(*(cloud.delete(m.meta.id) for m in made))
    await asyncio.gather(*(cloud.wait_gone(m.meta.id) for m in made))
    left = await cloud.wait_clean([m.meta.id for m in made])
    assert left.empty(), left


async def test_deletes_at_every_step_of_the_build_all_finish(cloud: ComputeCloud) -> None:
    """Deleted at once and then every 50 ms: some while the root disk is still being made,
    which storage will not delete until it is made: each delete waits and finishes."""
    made = await asyncio.gather(*(cloud.create() for _ in range(8)))

    async def delete_after(index: int, server: Instance) -> None:
        await asyncio.sleep(0.05 * index)
        await cloud.delete(server.meta.id)

    await asyncio.gather(*(delete_after(i, m) for i, m in enumerate(made)))
    await asyncio.gather(*(cloud.wait_gone(m.meta.id) for m in made))
    left = await cloud.wait_clean([m.meta.id for m in made])
    assert left.empty(), left


async def _compute_usage(cloud: ComputeCloud) -> dict[str, int]:
    used = await _usage(cloud)
    return {name: used[name] for name in ("instances", "vcpus", "ram_mb") if used.get(name)}


async def _limit_instances(cloud: ComputeCloud, limit: int) -> None:
    key = quota.quota_key(cloud.project)
    found = await cloud.base.store.get(key, identity_pb2.Quota)
    found.value.limits["instances"] = limit
    await cloud.base.store.replace(key, found.value, expect_revision=found.mod_revision)


async def test_reset_to_active_after_a_failed_build_takes_the_quota_back(
        cloud: ComputeCloud) -> None:
    shape = cloud.server()
    shape.security_groups.append(str(uuid.uuid4()))  # the build ends ERROR, quota given back
    made = await cloud.create(shape)
    failed = await cloud.wait_final(made.meta.id)
    assert failed.state == Instance.ERROR and failed.quota_released
    assert not await _compute_usage(cloud)
    await _limit_instances(cloud, 0)
    reset = V.ResetInstanceStateRequest(id=made.meta.id, state=Instance.ACTIVE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.stub().ResetInstanceState(reset, metadata=cloud.admin)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "quota" in (caught.value.details() or ""), caught.value.details()
    assert (await cloud.get(made.meta.id)).state == Instance.ERROR  # type: ignore[union-attr]
    await _limit_instances(cloud, quota.UNLIMITED)
    active = await cloud.stub().ResetInstanceState(reset, metadata=cloud.admin)
    assert active.state == Instance.ACTIVE and not active.quota_released
    held = await _usage(cloud)
    assert (held["instances"], held["vcpus"], held["ram_mb"]) == (
        1, failed.flavor.vcpus, failed.flavor.ram_mb)
    await cloud.delete(made.meta.id)
    await cloud.wait_gone(made.meta.id)
    assert not await _compute_usage(cloud)


async def test_concurrent_creates_of_one_project_share_the_quota(cloud: ComputeCloud) -> None:
    """Many creates at once (gathered into shared transactions): those within the quota
    succeed, the rest are RESOURCE_EXHAUSTED and leave nothing, and the copies of one
    request_id get one instance, or all fail alike."""
    await _limit_instances(cloud, 5)
    stub = cloud.stub()
    request_ids = [str(uuid.uuid4()) for _ in range(8)]
    sent: list[tuple[str, Instance]] = []
    for n, request_id in enumerate(request_ids):
        shape = cloud.server(f"batch-{n}")
        sent += [(request_id, shape)] * (3 if n == 0 else 2)
    sent += [("", cloud.server(f"plain-{n}")) for n in range(4)]
    results = await asyncio.gather(
        *(cloud.create(shape, request_id=request_id, stub=stub) for request_id, shape in sent),
        return_exceptions=True)
    made: dict[str, str] = {}
    for (request_id, _), result in zip(sent, results, strict=True):
        if isinstance(result, grpc.aio.AioRpcError):
            assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result.details()
            assert reason_of(result) == "nubis.quota.exceeded"
            continue
        assert isinstance(result, Instance), result
        made[result.meta.id] = request_id
    assert len(made) == 5
    for request_id in request_ids:  # every copy of a request_id: one instance, or all refused
        answers = {r.meta.id if isinstance(r, Instance) else "refused"
                   for (rid, _), r in zip(sent, results, strict=True) if rid == request_id}
        assert len(answers) == 1, (request_id, answers)
        record = await cloud.base.store.find(requests.key(cloud.project, request_id),
                                             request_pb2.RequestRecord)
        if answers == {"refused"}:
            assert record is None
        else:
            assert record is not None and record.value.resource_id in answers
    stored, _ = await cloud.base.store.list_all(keys.INSTANCES, Instance)
    assert {item.value.meta.id for item in stored} == set(made)
    assert await _compute_usage(cloud) == {"instances": 5, "vcpus": 5, "ram_mb": 5 * 64}
    for instance_id in made:
        assert (await cloud.wait_final(instance_id)).state == Instance.ACTIVE
    shapes = dict(sent)
    instance_id, request_id = next((i, r) for i, r in made.items() if r)  # 4 had none
    again = await cloud.create(shapes[request_id], request_id=request_id)
    assert again.meta.id == instance_id
    await asyncio.gather(*(cloud.delete(instance_id) for instance_id in made))
    await asyncio.gather(*(cloud.wait_gone(instance_id) for instance_id in made))
    left = await cloud.wait_clean(list(made))
    assert left.empty(), left
