"""What a server's create makes of its flavor and key pair, through the whole cloud.

The cloud of the boot tests (tests.functional.compute.harness): a server of the
admin project names its flavor and, optionally, a key pair of the caller. A
disabled flavor, a private one the project was not given, and a key pair of
another user are refused before anything is written; the caller's own key pair
is accepted.
"""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import flavor_pb2, keypair_pb2

from services.compute import keys
from tests.functional.compute.harness import ComputeCloud, Instance, bare_cloud, cloud

__all__ = ["bare_cloud", "cloud"]

F = flavor_pb2
K = keypair_pb2


async def _refused(cloud: ComputeCloud, server: Instance) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.create(server)
    return caught.value


async def _set_state(cloud: ComputeCloud, state: F.Flavor.State.ValueType) -> None:
    await cloud.stub().UpdateFlavor(F.UpdateFlavorRequest(
        flavor=F.Flavor(meta=resource_pb2.ResourceMeta(id=cloud.flavor_id), state=state),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])), metadata=cloud.admin)


async def test_create_checks_the_flavor_and_the_key_pair(cloud: ComputeCloud) -> None:
    stub = cloud.stub()
    private = await stub.CreateFlavor(F.CreateFlavorRequest(flavor=F.Flavor(
        meta=resource_pb2.ResourceMeta(name=f"private-{uuid.uuid4().hex[:6]}"), vcpus=1,
        ram_mb=128, disk_gb=1, is_public=False)), metadata=cloud.admin)
    hidden = await _refused(cloud, cloud.server(flavor_id=private.meta.id))
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    await _set_state(cloud, F.Flavor.DISABLED)
    disabled = await _refused(cloud, cloud.server())
    assert disabled.code() == grpc.StatusCode.FAILED_PRECONDITION
    await _set_state(cloud, F.Flavor.ACTIVE)

    missing = await _refused(cloud, cloud.server(key_name="nobody-has-this-key"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert "key_name" in (missing.details() or "")
    await stub.CreateKeyPair(K.CreateKeyPairRequest(key_pair=K.KeyPair(
        meta=resource_pb2.ResourceMeta(name="boot-key"))), metadata=cloud.admin)
    made = await cloud.create(cloud.server(key_name="boot-key"))
    assert made.key_name == "boot-key" and made.state == Instance.BUILDING
    await cloud.wait_final(made.meta.id)
    await cloud.delete(made.meta.id)
    await cloud.wait_gone(made.meta.id)


async def test_a_flavor_disabled_after_it_was_admitted_is_refused_at_the_commit(
        cloud: ComputeCloud) -> None:
    """Admission keeps a flavor it read for a moment, and a create's transaction takes it as
    the replica's last commit read it: both are checked at the commit, so a flavor disabled
    right after a boot refuses the next create (FAILED_PRECONDITION naming the field), which
    writes nothing."""
    made = await cloud.create(cloud.server())
    await _set_state(cloud, F.Flavor.DISABLED)
    try:
        refused = await _refused(cloud, cloud.server())
    finally:
        await _set_state(cloud, F.Flavor.ACTIVE)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "instance.flavor_id" in (refused.details() or "")
    stored, _ = await cloud.base.store.list_all(keys.INSTANCES, Instance)
    assert [item.value.meta.id for item in stored] == [made.meta.id]
    again = await cloud.create(cloud.server())  # active again: admitted and committed
    for instance_id in (made.meta.id, again.meta.id):
        await cloud.wait_final(instance_id)
        await cloud.delete(instance_id)
        await cloud.wait_gone(instance_id)
