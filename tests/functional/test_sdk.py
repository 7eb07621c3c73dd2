"""The SDK against a real cloud: identity, scheduler, storage, network, compute, two agents.

Found through the catalog from identity's address alone; a server booted and
awaited on WatchInstances; typed errors with their code, reason and field
violations; a killed compute replica still listed in the catalog skipped;
a revoked token refused; waits that fail, time out, or end in a deletion.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nubis
import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    compute_service_pb2_grpc,
    flavor_pb2,
    instance_pb2,
    instance_requests_pb2,
    instance_verbs_pb2,
)
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.storage.v1 import volume_pb2

from services.client import sdk
from services.client.lab import daemons
from services.client.peers import token as tokens
from services.client.sdk import waiters
from services.common import errors
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional.authz.world import ADMIN_PASSWORD
from tests.functional.cli_runner import Nubis
from tests.functional.compute import harness
from tests.functional.compute.harness import ComputeCloud

Instance = instance_pb2.Instance
R = instance_requests_pb2


@pytest.fixture(scope="module")
async def shared_cloud(etcd: EtcdEndpoint, redis: RedisEndpoint,
                       tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ComputeCloud]:
    """One cloud for the module (compute as a process, so a test can kill a replica)."""
    made = await harness.build(etcd, redis, tmp_path_factory.mktemp("sdk"), in_process=False)
    try:
        made.start_compute_process()
        yield made
    finally:
        await made.close()


def _connect(cloud: ComputeCloud, tmp_path: Path, *, username: str = "admin",
             password: str = ADMIN_PASSWORD, token: str = "") -> sdk.Cloud:
    """The SDK as the cloud admin (or with `token`), told identity's address and nothing else."""
    identity = cloud.base.identity.running.address
    if token:
        return nubis.connect(identity=identity, lab_dir=tmp_path, token=token)
    return nubis.connect(identity=identity, lab_dir=tmp_path, username=username,
                         password=password, project=cloud.project)


def _server(cloud: ComputeCloud) -> R.CreateInstanceRequest:
    return R.CreateInstanceRequest(instance=cloud.server(), request_id=str(uuid.uuid4()))


async def test_a_server_is_booted_awaited_on_the_watch_and_deleted(
        shared_cloud: ComputeCloud, tmp_path: Path) -> None:
    async with _connect(shared_cloud, tmp_path) as cloud:
        made = await cloud.compute.CreateInstance(_server(shared_cloud))
        assert made.state == Instance.BUILDING
        active = await cloud.wait_for_instance(made.meta.id, "ACTIVE", within=120)
        assert active.state == Instance.ACTIVE and not active.task_id
        assert active.node in harness.NODES
        # Asked of the node's agent, not read from etcd.
        assert await shared_cloud.domain_state(active.node, made.meta.id) == "running"
        await cloud.compute.DeleteInstance(R.DeleteInstanceRequest(id=made.meta.id))
        assert await cloud.wait_for_instance(made.meta.id, Instance.DELETED, within=60) is None
        with pytest.raises(errors.NotFound) as gone:
            await cloud.compute.GetInstance(R.GetInstanceRequest(id=made.meta.id))
        assert gone.value.code == "NOT_FOUND" and gone.value.reason


async def test_a_retried_create_with_its_request_id_returns_the_same_server(
        shared_cloud: ComputeCloud, tmp_path: Path) -> None:
    async with _connect(shared_cloud, tmp_path) as cloud:
        request = _server(shared_cloud)
        first = await cloud.compute.CreateInstance(request)
        second = await cloud.compute.CreateInstance(request)
        assert second.meta.id == first.meta.id
        await cloud.compute.DeleteInstance(R.DeleteInstanceRequest(id=first.meta.id))
        assert await cloud.wait_for_instance(first.meta.id, "DELETED", within=60) is None


async def test_errors_carry_code_reason_and_field_violations(
        shared_cloud: ComputeCloud, tmp_path: Path) -> None:
    async with _connect(shared_cloud, tmp_path) as cloud:
        with pytest.raises(errors.NotFound) as missing:
            await cloud.compute.GetInstance(R.GetInstanceRequest(id=str(uuid.uuid4())))
        assert missing.value.code == "NOT_FOUND"
        assert missing.value.reason.startswith("nubis.")
        bad = Instance(meta=resource_pb2.ResourceMeta(name="bad name!"))
        with pytest.raises(errors.InvalidArgument) as refused:
            await cloud.compute.CreateInstance(R.CreateInstanceRequest(instance=bad))
        assert refused.value.code == "INVALID_ARGUMENT"
        fields = {violation.field for violation in refused.value.violations}
        assert "instance.flavor_id" in fields, fields
        with pytest.raises(errors.InvalidArgument) as unknown:
            await cloud.wait_for_instance(str(uuid.uuid4()), "RUNNING")
        assert unknown.value.violations[0].field == "states"
        flavor = await cloud.find("flavor", shared_cloud.flavor_id)
        assert (await cloud.find("flavor", flavor.meta.name)).meta.id == flavor.meta.id
        with pytest.raises(errors.NotFound):
            await cloud.find("network", "no-such-network")
        with pytest.raises(errors.InvalidArgument) as kind:
            await cloud.find("spaceship", "x")
        assert kind.value.violations[0].field == "kind"


async def test_a_bad_password_and_a_revoked_token_are_refused(
        shared_cloud: ComputeCloud, tmp_path: Path) -> None:
    wrong = _connect(shared_cloud, tmp_path, password="not-the-password")
    async with wrong:
        with pytest.raises(errors.Unauthenticated) as refused:
            await wrong.compute.ListFlavors(flavor_pb2.ListFlavorsRequest())
        assert refused.value.code == "UNAUTHENTICATED"
        assert refused.value.reason == "nubis.auth.invalid_credentials"
    async with _connect(shared_cloud, tmp_path) as admin:
        token = await admin.token()
        async with _connect(shared_cloud, tmp_path, token=token) as given:
            await given.compute.ListInstances(R.ListInstancesRequest())
            await admin.identity.RevokeToken(identity_pb2.RevokeTokenRequest(token=token))
            deadline = time.monotonic() + 15
            with pytest.raises(errors.Unauthenticated):  # once compute knows of the revocation
                while time.monotonic() < deadline:
                    await given.compute.ListInstances(R.ListInstancesRequest())
                    await asyncio.sleep(0.2)
            # A given token cannot be renewed: later calls fail at once, nothing sent.
            with pytest.raises(errors.Unauthenticated) as later:
                await given.compute.ListInstances(R.ListInstancesRequest())
            assert later.value.reason == tokens.REFUSED
        # A password login logs in again when its token is refused.
        await admin.compute.ListInstances(R.ListInstancesRequest())
        assert await admin.token() != token


async def test_connect_without_credentials_says_how_to_get_them(
        shared_cloud: ComputeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NUBIS_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(errors.Unauthenticated) as none:
        nubis.connect(identity=shared_cloud.base.identity.running.address, lab_dir=tmp_path)
    assert "nubis login" in none.value.message
    with pytest.raises(errors.InvalidArgument):
        nubis.connect(identity="127.0.0.1:1", username="admin")


async def test_a_failed_boot_raises_with_its_fault_and_a_wait_times_out(
        shared_cloud: ComputeCloud, tmp_path: Path) -> None:
    async with _connect(shared_cloud, tmp_path) as cloud:
        imageless = _server(shared_cloud)
        imageless.instance.image_id = str(uuid.uuid4())  # no such image
        with pytest.raises(errors.NubisError) as refused:
            await cloud.compute.CreateInstance(imageless)
        assert refused.value.code in ("NOT_FOUND", "INVALID_ARGUMENT"), refused.value
        nowhere = await cloud.compute.CreateFlavor(flavor_pb2.CreateFlavorRequest(
            flavor=flavor_pb2.Flavor(meta=resource_pb2.ResourceMeta(
                name=f"nowhere-{uuid.uuid4().hex[:6]}"), vcpus=1, ram_mb=64, disk_gb=1,
                is_public=True, required_traits=["CUSTOM_NO_NODE_HAS_IT"])))
        unplaceable = _server(shared_cloud)
        unplaceable.instance.flavor_id = nowhere.meta.id
        doomed = await cloud.compute.CreateInstance(unplaceable)
        with pytest.raises(sdk.ResourceFailed) as failed:
            await cloud.wait_for_instance(doomed.meta.id, within=120)
        assert failed.value.fault_reason == "nubis.scheduler.no_valid_node", failed.value
        assert failed.value.resource.state == Instance.ERROR  # type: ignore[attr-defined]
        assert "ERROR" in failed.value.message
        await cloud.compute.DeleteInstance(R.DeleteInstanceRequest(id=doomed.meta.id))
        assert await cloud.wait_for_instance(doomed.meta.id, "DELETED", within=60) is None
        made = await cloud.compute.CreateInstance(_server(shared_cloud))
        with pytest.raises(waiters.WaitTimeout) as late:
            await cloud.wait_for_instance(made.meta.id, "STOPPED", within=1.5)
        assert late.value.code == "DEADLINE_EXCEEDED"
        await cloud.wait_for_instance(made.meta.id, within=120)
        await cloud.compute.StopInstance(instance_verbs_pb2.StopInstanceRequest(id=made.meta.id))
        stopped = await cloud.wait_for_instance(made.meta.id, "STOPPED", within=60)
        assert stopped.state == Instance.STOPPED
        waiting = asyncio.ensure_future(cloud.wait_for_instance(made.meta.id, "ACTIVE",
                                                                within=60))
        await asyncio.sleep(0.5)
        await cloud.compute.DeleteInstance(R.DeleteInstanceRequest(id=made.meta.id))
        with pytest.raises(errors.NotFound):
            await waiting
        assert await cloud.wait_for_instance(made.meta.id, "DELETED", within=60) is None


async def test_a_volume_is_awaited_on_its_watch(shared_cloud: ComputeCloud,
                                                tmp_path: Path) -> None:
    async with _connect(shared_cloud, tmp_path) as cloud:
        made = await cloud.storage.CreateVolume(volume_pb2.CreateVolumeRequest(
            volume=volume_pb2.Volume(meta=resource_pb2.ResourceMeta(name="sdk-data"),
                                     size_gb=1)))
        ready = await cloud.wait_for_volume(made.meta.id, within=60)
        assert ready.state == volume_pb2.Volume.AVAILABLE
        await cloud.storage.DeleteVolume(volume_pb2.DeleteVolumeRequest(id=made.meta.id))
        assert await cloud.wait_for_volume(made.meta.id, "DELETED", within=60) is None


async def test_a_killed_replica_still_in_the_catalog_is_skipped(
        shared_cloud: ComputeCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    first = shared_cloud.processes[0]
    port = daemons.free_port()
    second = shared_cloud.start_compute_process(port=port)
    by_address = {f"127.0.0.1:{shared_cloud.compute_port}": first, f"127.0.0.1:{port}": second}
    async with _connect(shared_cloud, tmp_path) as cloud:
        listed = await cloud.endpoints("compute")
        assert sorted(listed) == sorted(by_address)
        # The replica the catalog lists first dies; its entry outlives it until its lease ends.
        shared_cloud.kill(by_address[listed[0]])
        assert await cloud.endpoints("compute") == listed
        for _ in range(6):  # round the replicas: each call that meets the dead one moves on
            await cloud.compute.ListInstances(R.ListInstancesRequest())
        # The raw channel the CLI uses dials the live one.
        channel = await cloud.channel("compute")
        stub = compute_service_pb2_grpc.ComputeServiceStub(channel)
        await stub.ListInstances(R.ListInstancesRequest())
        # Identity's raw channel carries the token too.
        identity = identity_pb2_grpc.IdentityServiceStub(await cloud.channel("identity"))
        assert (await identity.ListProjects(identity_pb2.ListProjectsRequest())).projects
        # So does the CLI, told identity's address alone.
        cli = Nubis.configure(monkeypatch, capsys, tmp_path / "cli", await cloud.token(),
                              identity=shared_cloud.base.identity.running.address)
        for _ in range(3):
            assert await cli.json("server", "list") is not None
