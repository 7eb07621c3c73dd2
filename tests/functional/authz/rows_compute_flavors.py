"""Authorization rows of ComputeService's flavors and key pairs.

Flavors are cloud-wide: every project role (and another nubis service) reads
the public ones and the private ones its project was given; only cloud-admins
create, change, delete or share them, and list every private one. Key pairs
are their user's: the user (a member or more, to write) sees and changes them,
everyone else — the same project's other users included — gets NOT_FOUND, and
only cloud-admins list every user's.
"""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2, keypair_pb2

from services.common.settings import ServiceEndpoint
from services.compute import main
from tests.functional.authz.table import (
    DENIED,
    HIDDEN,
    OK,
    SERVICES,
    Row,
    add_rows,
    add_service,
    cloud_only,
    expect,
    project_read,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.compute.v1.ComputeService"
F = flavor_pb2
K = keypair_pb2


async def _start(world: World) -> Service:
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


if SERVICE not in SERVICES:
    add_service(SERVICE, _start)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _flavor(world: World, *, public: bool = True, access: str = "") -> str:
    """A flavor made by the cloud-admin (private ones shared with `access`, if given)."""
    reply = await world.call(SERVICE, "CreateFlavor", F.CreateFlavorRequest(flavor=F.Flavor(
        meta=resource_pb2.ResourceMeta(name=_name("authz-f")), vcpus=1, ram_mb=128,
        is_public=public)), "cloud_admin")
    assert isinstance(reply, F.Flavor)
    if access:
        await world.call(SERVICE, "AddFlavorAccess", F.FlavorAccessRequest(
            flavor_id=reply.meta.id, project_id=access), "cloud_admin")
    return reply.meta.id


async def _key_pair(world: World) -> str:
    """A key pair of project A's member (generated)."""
    reply = await world.call(SERVICE, "CreateKeyPair", K.CreateKeyPairRequest(
        key_pair=K.KeyPair(meta=resource_pb2.ResourceMeta(name=_name("authz-k")))), "a_member")
    assert isinstance(reply, K.CreateKeyPairResponse)
    return reply.key_pair.meta.id


def _with_service(codes: dict[str, grpc.StatusCode]) -> dict[str, grpc.StatusCode]:
    return {**codes, "service": OK}


def _owner_only(*, readers: grpc.StatusCode = HIDDEN) -> dict[str, grpc.StatusCode]:
    """Project A's member (its user) and the cloud-admin; everyone else is hidden from it."""
    return expect(a_admin=HIDDEN, a_reader=readers, b_admin=HIDDEN)


def _no_private_of_others(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, F.ListFlavorsResponse)
    own = {"a_admin": world.project_a, "a_member": world.project_a, "a_reader": world.project_a,
           "b_admin": world.project_b}.get(caller)
    if own is None:
        return
    for item in reply.flavors:
        assert item.is_public or own in item.access_project_ids, (caller, item.meta.id)


def _only_own_keys(world: World, caller: str, reply: message.Message) -> None:
    assert isinstance(reply, K.ListKeyPairsResponse)
    for item in reply.key_pairs:
        assert item.user_id == world.users.get(caller, item.user_id), (caller, item.meta.id)


async def _get_public(world: World) -> message.Message:
    return F.GetFlavorRequest(id=await _flavor(world))


async def _get_shared_with_a(world: World) -> message.Message:
    return F.GetFlavorRequest(id=await _flavor(world, public=False, access=world.project_a))


async def _list_flavors(world: World) -> message.Message:
    await _flavor(world, public=False)
    await _flavor(world, public=False, access=world.project_a)
    return F.ListFlavorsRequest(page_size=1000)


async def _create_flavor(world: World) -> message.Message:
    return F.CreateFlavorRequest(flavor=F.Flavor(
        meta=resource_pb2.ResourceMeta(name=_name("authz-f")), vcpus=1, ram_mb=64))


async def _update_flavor(world: World) -> message.Message:
    return F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=await _flavor(world),
                                                       description="changed")),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.description"]))


async def _delete_flavor(world: World) -> message.Message:
    return F.DeleteFlavorRequest(id=await _flavor(world))


async def _add_access(world: World) -> message.Message:
    return F.FlavorAccessRequest(flavor_id=await _flavor(world, public=False),
                                 project_id=world.project_a)


async def _remove_access(world: World) -> message.Message:
    return F.FlavorAccessRequest(flavor_id=await _flavor(world, public=False,
                                                         access=world.project_a),
                                 project_id=world.project_a)


async def _get_key(world: World) -> message.Message:
    return K.GetKeyPairRequest(id=await _key_pair(world))


async def _list_keys(world: World) -> message.Message:
    await _key_pair(world)
    return K.ListKeyPairsRequest(page_size=1000)


async def _create_key(world: World) -> message.Message:
    return K.CreateKeyPairRequest(key_pair=K.KeyPair(
        meta=resource_pb2.ResourceMeta(name=_name("authz-k"))))


async def _update_key(world: World) -> message.Message:
    return K.UpdateKeyPairRequest(
        key_pair=K.KeyPair(meta=resource_pb2.ResourceMeta(id=await _key_pair(world),
                                                          labels={"seen": "yes"})),
        update_mask=field_mask_pb2.FieldMask(paths=["meta.labels"]))


async def _delete_key(world: World) -> message.Message:
    return K.DeleteKeyPairRequest(id=await _key_pair(world))


async def _fixed(request: message.Message) -> message.Message:
    return request


add_rows(
    Row(SERVICE, "GetFlavor", _get_public, _with_service(expect()), case="public"),
    Row(SERVICE, "GetFlavor", _get_shared_with_a, _with_service(project_read()),
        case="private, shared with A"),
    Row(SERVICE, "ListFlavors", _list_flavors, expect(), check=_no_private_of_others),
    Row(SERVICE, "ListFlavors", lambda world: _fixed(F.ListFlavorsRequest(all_projects=True)),
        cloud_only(), case="all_projects"),
    Row(SERVICE, "CreateFlavor", _create_flavor, cloud_only()),
    Row(SERVICE, "UpdateFlavor", _update_flavor, cloud_only()),
    Row(SERVICE, "DeleteFlavor", _delete_flavor, cloud_only()),
    Row(SERVICE, "AddFlavorAccess", _add_access, cloud_only()),
    Row(SERVICE, "RemoveFlavorAccess", _remove_access, cloud_only()),
    Row(SERVICE, "GetKeyPair", _get_key, _owner_only()),
    Row(SERVICE, "ListKeyPairs", _list_keys, expect(), check=_only_own_keys),
    Row(SERVICE, "ListKeyPairs", lambda world: _fixed(K.ListKeyPairsRequest(all_projects=True)),
        cloud_only(), case="all_projects"),
    Row(SERVICE, "CreateKeyPair", _create_key, expect(a_reader=DENIED)),
    Row(SERVICE, "UpdateKeyPair", _update_key, _owner_only(readers=DENIED)),
    Row(SERVICE, "DeleteKeyPair", _delete_key, _owner_only(readers=DENIED)),
)
