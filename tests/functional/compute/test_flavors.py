"""Flavors through a real compute service: the default set, visibility, names, sizes, access.

The starting state is the world of the authorization tests (projects A and B,
a cloud-admin) and one compute service, which seeded the default flavors when
it started. Each test makes flavors with names of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, wrappers_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2

from services.common import errors
from services.common.store import Store
from services.compute import flavor, keys
from tests.conftest import EtcdEndpoint
from tests.functional.compute.flavor_harness import (
    ComputeWorld,
    compute,
    reason_of,
    start_compute,
)

__all__ = ["compute"]

F = flavor_pb2
State = F.Flavor.State
DEFAULT_NAMES = {"m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"}


def _name(prefix: str = "f") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def _create(compute: ComputeWorld, *, name: str = "", caller: str = "cloud_admin",
                  **fields: Any) -> F.Flavor:
    fields.setdefault("vcpus", 1)
    fields.setdefault("ram_mb", 256)
    sent = F.Flavor(meta=resource_pb2.ResourceMeta(name=name or _name()), **fields)
    made: F.Flavor = await compute.stub.CreateFlavor(F.CreateFlavorRequest(flavor=sent),
                                                     metadata=compute.as_(caller))
    return made


async def _names(compute: ComputeWorld, caller: str, **request: Any) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        reply = await compute.stub.ListFlavors(F.ListFlavorsRequest(
            page_size=2, page_token=token, **request), metadata=compute.as_(caller))
        found |= {item.meta.name for item in reply.flavors}
        token = reply.next_page_token
        if not token:
            return found


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# --- the default set ----------------------------------------------------------------------

async def test_defaults_are_seeded_public_with_their_sizes(compute: ComputeWorld) -> None:
    reply = await compute.stub.ListFlavors(F.ListFlavorsRequest(filter="is_public=true"),
                                           metadata=compute.as_("a_reader"))
    sizes = {item.meta.name: (item.vcpus, item.ram_mb, item.disk_gb) for item in reply.flavors
             if item.meta.name in DEFAULT_NAMES}
    assert sizes == {"m1.tiny": (1, 512, 1), "m1.small": (1, 2048, 20),
                     "m1.medium": (2, 4096, 40), "m1.large": (4, 8192, 80),
                     "m1.xlarge": (8, 16384, 160)}
    assert all(item.state == State.ACTIVE for item in reply.flavors)


async def test_a_deleted_default_stays_deleted_when_compute_starts_again(
        compute: ComputeWorld) -> None:
    admin = compute.as_("cloud_admin")
    listed = await compute.stub.ListFlavors(F.ListFlavorsRequest(filter="name=m1.xlarge"),
                                            metadata=admin)
    [xlarge] = listed.flavors
    await compute.stub.DeleteFlavor(F.DeleteFlavorRequest(id=xlarge.meta.id), metadata=admin)
    again = await start_compute(compute.world)  # a restart, or a second replica
    try:
        assert "m1.xlarge" not in await _names(compute, "cloud_admin")
        assert {"m1.tiny", "m1.small"} <= await _names(compute, "cloud_admin")
    finally:
        await again.stop()


async def test_racing_seeds_write_the_set_once(etcd: EtcdEndpoint) -> None:
    stores = [await Store.connect([etcd.endpoint], root=f"/test-seed-{uuid.uuid4().hex[:8]}")]
    stores += [await Store.connect([etcd.endpoint], root=stores[0].root) for _ in range(3)]
    try:
        await asyncio.gather(*(flavor.seed_defaults(store) for store in stores))
        items, _ = await stores[0].list_all(keys.FLAVORS, F.Flavor)
        assert sorted(item.value.meta.name for item in items) == sorted(DEFAULT_NAMES)
        marker = await stores[0].get(keys.DEFAULT_FLAVORS, wrappers_pb2.StringValue)
        assert set(marker.value.value.split()) == DEFAULT_NAMES
    finally:
        for store in stores:
            await store.close()


# --- create, names, sizes -----------------------------------------------------------------

async def test_create_derives_traits_from_extra_specs(compute: ComputeWorld) -> None:
    made = await _create(compute, extra_specs={
        "trait:HW_CPU_X86_AVX2": "required", "trait:CUSTOM_SLOW_DISK": "forbidden",
        "hw:cpu_policy": "dedicated"}, required_traits=["COMPUTE_VOLUME_MULTI_ATTACH"])
    assert list(made.required_traits) == ["COMPUTE_VOLUME_MULTI_ATTACH", "HW_CPU_X86_AVX2"]
    assert list(made.forbidden_traits) == ["CUSTOM_SLOW_DISK"]
    assert made.extra_specs["trait:COMPUTE_VOLUME_MULTI_ATTACH"] == "required"
    assert made.state == State.ACTIVE and made.meta.revision > 0
    # Dropping the trait from the specs drops it from the traits.
    changed = await compute.stub.UpdateFlavor(F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=made.meta.id),
                        extra_specs={"hw:cpu_policy": "shared"}),
        update_mask=_mask("extra_specs")), metadata=compute.as_("cloud_admin"))
    assert not changed.required_traits and not changed.forbidden_traits


@pytest.mark.parametrize(("fields", "field"), [
    ({"vcpus": 0}, "flavor.vcpus"),
    ({"ram_mb": 63}, "flavor.ram_mb"),
    ({"disk_gb": -1}, "flavor.disk_gb"),
    ({"swap_mb": -1}, "flavor.swap_mb"),
    ({"extra_specs": {"trait:lower_case": "required"}}, "flavor.extra_specs.trait:lower_case"),
    ({"extra_specs": {"trait:HW_X": "preferred"}}, "flavor.extra_specs.trait:HW_X"),
    ({"extra_specs": {"bad key": "x"}}, "flavor.extra_specs.bad key"),
])
async def test_bad_sizes_and_specs_are_refused(compute: ComputeWorld, fields: dict[str, Any],
                                               field: str) -> None:
    refused = await _error(_create(compute, **fields))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.details() or "") or reason_of(refused) == "nubis.invalid_argument"


async def test_two_concurrent_creates_of_one_name_one_wins(compute: ComputeWorld) -> None:
    name = _name("race")
    results = await asyncio.gather(*(_create(compute, name=name, vcpus=vcpus)
                                     for vcpus in (1, 2, 3, 4)), return_exceptions=True)
    made = [item for item in results if isinstance(item, F.Flavor)]
    lost = [item for item in results if isinstance(item, grpc.aio.AioRpcError)]
    assert len(made) == 1 and len(lost) == 3
    assert {(exc.code(), reason_of(exc)) for exc in lost} == {
        (grpc.StatusCode.ALREADY_EXISTS, flavor.NAME_TAKEN)}
    assert await _names(compute, "cloud_admin", filter=f"name={name}",
                        all_projects=True) == {name}


async def test_request_id_replays_and_validate_only_writes_nothing(
        compute: ComputeWorld) -> None:
    admin = compute.as_("cloud_admin")
    sent = F.Flavor(meta=resource_pb2.ResourceMeta(name=_name()), vcpus=2, ram_mb=512)
    dry = await compute.stub.CreateFlavor(F.CreateFlavorRequest(flavor=sent, validate_only=True),
                                          metadata=admin)
    assert dry.meta.id == "" and dry.vcpus == 2
    assert sent.meta.name not in await _names(compute, "cloud_admin", all_projects=True)
    request = F.CreateFlavorRequest(flavor=sent, request_id=str(uuid.uuid4()))
    first = await compute.stub.CreateFlavor(request, metadata=admin)
    second = await compute.stub.CreateFlavor(request, metadata=admin)
    assert first.meta.id == second.meta.id
    # The dry run of a name now taken says so.
    taken = await _error(compute.stub.CreateFlavor(
        F.CreateFlavorRequest(flavor=sent, validate_only=True), metadata=admin))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_sizes_are_immutable_and_renames_move_the_name(compute: ComputeWorld) -> None:
    admin = compute.as_("cloud_admin")
    made = await _create(compute, vcpus=2)
    refused = await _error(compute.stub.UpdateFlavor(F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=made.meta.id), vcpus=4),
        update_mask=_mask("vcpus")), metadata=admin))
    assert (refused.code(), reason_of(refused)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    flavor.IMMUTABLE)
    new_name = _name("renamed")
    renamed = await compute.stub.UpdateFlavor(F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=made.meta.id, name=new_name,
                                                       revision=made.meta.revision)),
        update_mask=_mask("meta.name")), metadata=admin)
    assert renamed.meta.name == new_name and renamed.vcpus == 2
    # The old name is free again; the new one is taken.
    await _create(compute, name=made.meta.name)
    taken = await _error(_create(compute, name=new_name))
    assert (taken.code(), reason_of(taken)) == (grpc.StatusCode.ALREADY_EXISTS, flavor.NAME_TAKEN)
    stale = await _error(compute.stub.DeleteFlavor(F.DeleteFlavorRequest(
        id=made.meta.id, revision=made.meta.revision), metadata=admin))
    assert stale.code() == grpc.StatusCode.ABORTED
    await compute.stub.DeleteFlavor(F.DeleteFlavorRequest(
        id=made.meta.id, revision=renamed.meta.revision), metadata=admin)
    await _create(compute, name=new_name)


# --- visibility and access ----------------------------------------------------------------

async def test_private_flavor_is_seen_only_with_access(compute: ComputeWorld) -> None:
    world = compute.world
    admin = compute.as_("cloud_admin")
    made = await _create(compute, is_public=False)
    get = F.GetFlavorRequest(id=made.meta.id)
    for caller in ("a_reader", "b_admin"):
        hidden = await _error(compute.stub.GetFlavor(get, metadata=compute.as_(caller)))
        assert hidden.code() == grpc.StatusCode.NOT_FOUND
    assert made.meta.name not in await _names(compute, "a_reader")
    await compute.stub.AddFlavorAccess(F.FlavorAccessRequest(
        flavor_id=made.meta.id, project_id=world.project_a), metadata=admin)
    shared = await compute.stub.GetFlavor(get, metadata=compute.as_("a_reader"))
    assert list(shared.access_project_ids) == [world.project_a]
    assert made.meta.name in await _names(compute, "a_member", filter="is_public=false")
    assert made.meta.name not in await _names(compute, "b_admin")
    # A cloud-admin lists every private flavor only when asked to.
    assert made.meta.name in await _names(compute, "cloud_admin", all_projects=True)
    assert made.meta.name not in await _names(compute, "cloud_admin")
    denied = await _error(compute.stub.ListFlavors(F.ListFlavorsRequest(all_projects=True),
                                                   metadata=compute.as_("a_admin")))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    await compute.stub.RemoveFlavorAccess(F.FlavorAccessRequest(
        flavor_id=made.meta.id, project_id=world.project_a), metadata=admin)
    gone = await _error(compute.stub.GetFlavor(get, metadata=compute.as_("a_reader")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_access_to_a_public_flavor_is_refused(compute: ComputeWorld) -> None:
    made = await _create(compute, is_public=True)
    refused = await _error(compute.stub.AddFlavorAccess(F.FlavorAccessRequest(
        flavor_id=made.meta.id, project_id=compute.world.project_a),
        metadata=compute.as_("cloud_admin")))
    assert (refused.code(), reason_of(refused)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                    flavor.PUBLIC)
    bad = await _error(compute.stub.AddFlavorAccess(F.FlavorAccessRequest(
        flavor_id=made.meta.id, project_id="not-a-project"), metadata=compute.as_("cloud_admin")))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_only_cloud_admins_write_flavors(compute: ComputeWorld) -> None:
    denied = await _error(_create(compute, caller="a_admin"))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


# --- the boot path ------------------------------------------------------------------------

async def test_usable_refuses_disabled_and_invisible_flavors(compute: ComputeWorld) -> None:
    world = compute.world
    made = await _create(compute, is_public=False)
    with pytest.raises(errors.NotFound):
        await flavor.usable(compute.store, world.project_a, made.meta.id)
    await compute.stub.AddFlavorAccess(F.FlavorAccessRequest(
        flavor_id=made.meta.id, project_id=world.project_a), metadata=compute.as_("cloud_admin"))
    assert (await flavor.usable(compute.store, world.project_a, made.meta.id)).vcpus == 1
    with pytest.raises(errors.NotFound):
        await flavor.usable(compute.store, world.project_b, made.meta.id)
    await compute.stub.UpdateFlavor(F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=made.meta.id), state=State.DISABLED),
        update_mask=_mask("state")), metadata=compute.as_("cloud_admin"))
    with pytest.raises(errors.FailedPrecondition) as disabled:
        await flavor.usable(compute.store, world.project_a, made.meta.id)
    assert disabled.value.reason == flavor.DISABLED
    # Disabled flavors are still listed (existing instances name them).
    assert made.meta.name in await _names(compute, "a_reader", filter="state=DISABLED")
    with pytest.raises(errors.NotFound):
        await flavor.usable(compute.store, world.project_a, str(uuid.uuid4()))
