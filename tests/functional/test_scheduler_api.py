"""SchedulerService API conventions end to end: request_id, validate_only, revision, filters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common import pages, requests
from services.common.store import Store
from services.scheduler import nodes, server_groups
from tests.conftest import EtcdEndpoint
from tests.functional import scheduler_harness as harness

P = scheduler_pb2


@pytest.fixture
async def replica(etcd: EtcdEndpoint, key_prefix: str) -> AsyncIterator[harness.Replica]:
    started = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    yield started
    await started.stop()


def _create(name: str, *, request_id: str = "", policy: int = P.AFFINITY,
            project: str = "p-1", labels: dict[str, str] | None = None,
            validate_only: bool = False) -> scheduler_pb2.CreateServerGroupRequest:
    meta = resource_pb2.ResourceMeta(name=name, project_id=project, labels=labels or {})
    return P.CreateServerGroupRequest(
        server_group=P.ServerGroup(meta=meta, policy=policy),  # type: ignore[arg-type]
        request_id=request_id, validate_only=validate_only)


async def _codes_of(call: Awaitable[object]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_create_with_a_request_id_is_idempotent(
    store: Store, replica: harness.Replica
) -> None:
    request_id = str(uuid.uuid4())
    first = await replica.stub.CreateServerGroup(_create("web", request_id=request_id))
    again = await replica.stub.CreateServerGroup(_create("web", request_id=request_id))
    assert again.meta.id == first.meta.id and again.meta.revision == first.meta.revision
    held = await store.get(requests.key("p-1", request_id), request_pb2.RequestRecord)
    assert held.value.resource_id == first.meta.id
    assert held.value.method == "nubis.scheduler.v1.SchedulerService.CreateServerGroup"
    # The same key with a different request is refused, and creates nothing.
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await replica.stub.CreateServerGroup(_create("db", request_id=request_id))
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # Keys are per project: another project may use the same one.
    other = await replica.stub.CreateServerGroup(
        _create("web", request_id=request_id, project="p-2"))
    assert other.meta.id != first.meta.id
    listed = await replica.stub.ListServerGroups(P.ListServerGroupsRequest())
    assert sorted(g.meta.id for g in listed.server_groups) == sorted([first.meta.id,
                                                                     other.meta.id])


async def test_racing_retries_of_one_request_create_one_group(replica: harness.Replica) -> None:
    request_id = str(uuid.uuid4())
    replies = await asyncio.gather(*(
        replica.stub.CreateServerGroup(_create("race", request_id=request_id))
        for _ in range(8)))
    assert len({reply.meta.id for reply in replies}) == 1
    listed = await replica.stub.ListServerGroups(P.ListServerGroupsRequest())
    assert [g.meta.id for g in listed.server_groups] == [replies[0].meta.id]


async def test_validate_only_checks_and_writes_nothing(replica: harness.Replica) -> None:
    shown = await replica.stub.CreateServerGroup(_create("dry", validate_only=True))
    assert shown.meta.name == "dry" and shown.meta.id == "" and shown.policy == P.AFFINITY
    listed = await replica.stub.ListServerGroups(P.ListServerGroupsRequest())
    assert list(listed.server_groups) == []
    bad = _create("", validate_only=True)
    assert await _codes_of(replica.stub.CreateServerGroup(bad)) == (
        grpc.StatusCode.INVALID_ARGUMENT)
    bad_key = _create("x", request_id="not/a key")
    assert await _codes_of(replica.stub.CreateServerGroup(bad_key)) == (
        grpc.StatusCode.INVALID_ARGUMENT)


async def test_delete_with_a_stale_revision_is_aborted(replica: harness.Replica) -> None:
    group = await replica.stub.CreateServerGroup(_create("rev"))
    stale = P.DeleteServerGroupRequest(id=group.meta.id, revision=group.meta.revision - 1)
    assert await _codes_of(replica.stub.DeleteServerGroup(stale)) == grpc.StatusCode.ABORTED
    negative = P.DeleteServerGroupRequest(id=group.meta.id, revision=-1)
    assert await _codes_of(replica.stub.DeleteServerGroup(negative)) == (
        grpc.StatusCode.INVALID_ARGUMENT)
    await replica.stub.DeleteServerGroup(
        P.DeleteServerGroupRequest(id=group.meta.id, revision=group.meta.revision))
    gone = replica.stub.GetServerGroup(P.GetServerGroupRequest(id=group.meta.id))
    assert await _codes_of(gone) == grpc.StatusCode.NOT_FOUND


async def test_list_server_groups_filter(replica: harness.Replica) -> None:
    web = await replica.stub.CreateServerGroup(
        _create("web", policy=P.ANTI_AFFINITY, labels={"env": "prod"}))
    db = await replica.stub.CreateServerGroup(_create("db", policy=P.SOFT_AFFINITY))
    other = await replica.stub.CreateServerGroup(_create("web", project="p-2"))

    async def ids(text: str) -> list[str]:
        reply = await replica.stub.ListServerGroups(P.ListServerGroupsRequest(filter=text))
        return sorted(group.meta.id for group in reply.server_groups)

    assert await ids("name=web") == sorted([web.meta.id, other.meta.id])
    assert await ids("policy=ANTI_AFFINITY,SOFT_AFFINITY") == sorted([web.meta.id, db.meta.id])
    assert await ids("label.env=prod") == [web.meta.id]
    assert await ids("name=web project_id=p-2") == [other.meta.id]
    for bad in ("colour=red", "policy=SIDEWAYS", "name", "name="):
        listed = replica.stub.ListServerGroups(P.ListServerGroupsRequest(filter=bad))
        assert await _codes_of(listed) == grpc.StatusCode.INVALID_ARGUMENT, bad
    first = await replica.stub.ListServerGroups(P.ListServerGroupsRequest(page_size=2))
    rest = await replica.stub.ListServerGroups(
        P.ListServerGroupsRequest(page_size=2, page_token=first.next_page_token))
    paged = [group.meta.id for group in [*first.server_groups, *rest.server_groups]]
    assert paged == sorted([web.meta.id, db.meta.id, other.meta.id])
    assert rest.next_page_token == ""
    nodes_token = pages.token(nodes.PAGE_LISTING, "n1")
    for token in ("bogus", web.meta.id, "%%%", "\u00e9t\u00e9", nodes_token):
        listed = replica.stub.ListServerGroups(P.ListServerGroupsRequest(page_token=token))
        assert await _codes_of(listed) == grpc.StatusCode.INVALID_ARGUMENT, token


async def test_list_nodes_filter(store: Store, replica: harness.Replica) -> None:
    await harness.put_node(store, harness.report("f1", traits=("CUSTOM_SSD",), zone="az1"))
    await harness.put_node(store, harness.report("f2", zone="az2", hypervisor="TEST"))
    await harness.put_node(store, harness.report("f3", traits=("CUSTOM_GPU",), zone="az1"))

    async def registered() -> bool:
        return all(replica.cache.settings(name) for name in ("f1", "f2", "f3"))

    await harness.wait_for(registered)
    await replica.stub.UpdateNode(P.UpdateNodeRequest(
        name="f3", settings=P.NodeSettings(disabled=True),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled"])))

    async def names(text: str) -> list[str]:
        reply = await replica.stub.ListNodes(P.ListNodesRequest(filter=text))
        return [node.name for node in reply.nodes]

    assert await names("") == ["f1", "f2", "f3"]
    assert await names("availability_zone=az1") == ["f1", "f3"]
    assert await names("trait=CUSTOM_SSD,CUSTOM_GPU disabled=false") == ["f1"]
    assert await names("hypervisor_type=TEST state=UP") == ["f2"]
    assert await names("state=DOWN") == []
    page = await replica.stub.ListNodes(P.ListNodesRequest(filter="name=f1,f3", page_size=1))
    rest = await replica.stub.ListNodes(P.ListNodesRequest(
        filter="name=f1,f3", page_size=1, page_token=page.next_page_token))
    assert [n.name for n in [*page.nodes, *rest.nodes]] == ["f1", "f3"]
    assert rest.next_page_token == ""
    for bad in ("state=SLEEPING", "disabled=maybe", "label.env=prod", "zone=az1"):
        listed = replica.stub.ListNodes(P.ListNodesRequest(filter=bad))
        assert await _codes_of(listed) == grpc.StatusCode.INVALID_ARGUMENT, bad
    # Tokens are opaque: a bare node name, garbage or another listing's token is refused.
    groups_token = pages.token(server_groups.PAGE_LISTING, str(uuid.uuid4()))
    for token in ("bogus", "f1", "%%%", pages.token("nodes", "not a name"),
                  groups_token):
        listed = replica.stub.ListNodes(P.ListNodesRequest(page_token=token))
        assert await _codes_of(listed) == grpc.StatusCode.INVALID_ARGUMENT, token
