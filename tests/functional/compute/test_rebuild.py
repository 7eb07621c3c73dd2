"""Rebuild from another image on the node the server is on (ports, addresses and claim kept,
the old root disk deleted, the new one running), refused while busy and for bad images, finished
by a compute process started after the one running it was killed; and a moved server's domain
keeps the kernel boot of its image."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import instance_action_pb2, operation_pb2
from nubis.compute.v1 import instance_verbs_pb2 as V
from nubis.network.v1 import port_pb2
from nubis.storage.v1 import attachment_pb2, image_pb2, volume_pb2

from services.client import peers
from services.compute import keys, move
from tests.functional.compute.harness import NODES, ComputeCloud, Instance, bare_cloud, cloud
from tests.functional.compute.test_hotplug import domain, idle, volume_on
from tests.functional.compute.test_migrate import reason
from tests.functional.compute.test_resize import (
    OLD,
    allocations,
    booted,
    exact,
    follow,
    node_usage,
)
from tests.functional.storage import volume_harness
from tests.functional.storage.harness import upload_messages

__all__ = ["bare_cloud", "cloud"]


async def _addresses(cloud: ComputeCloud, instance_id: str) -> dict[str, list[str]]:
    """The server's ports and their fixed addresses, asked of the network service."""
    found = await cloud.network_stub().ListPorts(port_pb2.ListPortsRequest(
        page_size=100, all_projects=True), metadata=cloud.admin)
    return {p.meta.id: sorted(ip.ip_address for ip in p.fixed_ips)
            for p in found.ports if p.device_id == instance_id}


async def test_rebuild_to_another_image_keeps_node_ports_and_claim(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    ports = await _addresses(cloud, server.meta.id)
    assert ports and all(ports.values())
    other = await volume_harness.active_image(cloud.base, public=True)

    started = await cloud.stub().RebuildInstance(V.RebuildInstanceRequest(
        id=server.meta.id, image_id=other, name="rebuilt"), metadata=cloud.admin)
    assert started.task_state == Instance.TASK_STATE_REBUILDING and started.task_id
    done, seen = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    assert all(held == {server.node: OLD} for _, held in seen), seen
    assert done.node == server.node and done.image_id == other != server.image_id
    assert done.meta.name == "rebuilt"
    assert list(done.port_ids) == list(server.port_ids)
    assert await _addresses(cloud, server.meta.id) == ports
    assert await exact(cloud, server.meta.id) == {server.node: OLD}
    assert await cloud.domain_state(server.node, server.meta.id) == "running"

    storage = cloud.base.stub()
    assert done.root_volume_id != server.root_volume_id
    new = await storage.GetVolume(volume_pb2.GetVolumeRequest(id=done.root_volume_id),
                                  metadata=cloud.admin)
    assert new.state == volume_pb2.Volume.IN_USE and new.source_image_id == other
    assert [item.volume_id for item in done.volumes if item.boot] == [done.root_volume_id]
    try:
        old = await storage.GetVolume(volume_pb2.GetVolumeRequest(id=server.root_volume_id),
                                      metadata=cloud.admin)
        assert old.state == volume_pb2.Volume.DELETING, old
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND

    actions = await cloud.stub().ListInstanceActions(
        instance_action_pb2.ListInstanceActionsRequest(instance_id=server.meta.id),
        metadata=cloud.admin)
    rebuilt = [a for a in actions.actions if a.action == "rebuild"]
    assert len(rebuilt) == 1 and rebuilt[0].state == rebuilt[0].SUCCEEDED, rebuilt
    assert "compute_rebuild_spawn" in [e.name for e in rebuilt[0].events]

    await cloud.delete(server.meta.id)
    await cloud.wait_gone(server.meta.id)
    assert (await cloud.wait_clean([server.meta.id])).empty()


async def test_rebuild_refused_while_busy_and_for_bad_images(cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub = cloud.stub()
    await stub.RebuildInstance(V.RebuildInstanceRequest(id=server.meta.id), metadata=cloud.admin)
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await stub.RebuildInstance(V.RebuildInstanceRequest(id=server.meta.id),
                                   metadata=cloud.admin)
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(busy.value) == "nubis.instance.busy"
    done, _ = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE and done.image_id == server.image_id, done.fault.message
    assert done.root_volume_id != server.root_volume_id

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.RebuildInstance(V.RebuildInstanceRequest(
            id=server.meta.id, image_id="00000000-0000-4000-8000-000000000000"),
            metadata=cloud.admin)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "image" in (missing.value.details() or "")
    _, member = await cloud.base.member_of_new_project("img")
    theirs = await _image(cloud, b"private" * 64, image_pb2.Image.DISK_FORMAT_RAW,
                          metadata=member, public=False)
    with pytest.raises(grpc.aio.AioRpcError) as private:
        await stub.RebuildInstance(V.RebuildInstanceRequest(id=server.meta.id, image_id=theirs),
                                   metadata=cloud.admin)
    assert private.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.RebuildInstance(V.RebuildInstanceRequest(id=server.meta.id, image_id="x"),
                                   metadata=cloud.admin)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unchanged = await cloud.get(server.meta.id)
    assert unchanged is not None and not unchanged.task_id
    assert unchanged.root_volume_id == done.root_volume_id


async def _image(cloud: ComputeCloud, data: bytes, disk_format: int, kernel: str = "",
                 ramdisk: str = "", cmdline: str = "", *,
                 metadata: tuple[tuple[str, str], ...] = (), public: bool = True) -> str:
    stub = cloud.base.stub()
    metadata = metadata or cloud.admin
    made = image_pb2.Image(meta=resource_pb2.ResourceMeta(name=f"k-{len(data)}-{disk_format}"),
                           kernel_image_id=kernel, ramdisk_image_id=ramdisk,
                           kernel_cmdline=cmdline)
    if public:
        made.visibility = image_pb2.Image.VISIBILITY_PUBLIC
    made.disk_format = disk_format  # type: ignore[assignment]
    image = await stub.CreateImage(image_pb2.CreateImageRequest(image=made), metadata=metadata)
    header = image_pb2.ImageUploadHeader(image_id=image.meta.id, size_bytes=len(data),
                                         checksum_sha256=hashlib.sha256(data).hexdigest())
    active = await stub.UploadImage(upload_messages(header, data), metadata=metadata)
    assert active.state == image_pb2.Image.ACTIVE
    return str(image.meta.id)


async def test_a_moved_domain_keeps_the_kernel_boot_of_its_image(cloud: ComputeCloud) -> None:
    Format = image_pb2.Image
    kernel = await _image(cloud, b"\x7fELF kernel" * 64, Format.DISK_FORMAT_KERNEL)
    ramdisk = await _image(cloud, b"initramfs" * 64, Format.DISK_FORMAT_RAMDISK)
    disk = await _image(cloud, b"\0" * 4096, Format.DISK_FORMAT_RAW, kernel, ramdisk,
                        "console=ttyS0 root=/dev/vda")
    server = Instance(meta=resource_pb2.ResourceMeta(id="5b1c0f3e-7d2a-4c11-9e0f-1a2b3c4d5e6f",
                                                     name="k", project_id=cloud.project),
                      image_id=disk)
    clients = peers.ServiceClients(peers.ClientSettings.from_settings(cloud.base.settings))
    try:
        spec = await move.domain_spec(clients.storage, server, server.flavor,
                                      attachment_pb2.DiskConnection(path="/d", format="qcow2"),
                                      "v", [])
        plain = Instance()
        plain.CopyFrom(server)
        plain.image_id = cloud.image_id
        without = await move.domain_spec(clients.storage, plain, server.flavor,
                                         attachment_pb2.DiskConnection(path="/d"), "v", [])
    finally:
        await clients.close()
    assert spec.HasField("kernel_boot")
    assert spec.kernel_boot.kernel.image_id == kernel
    assert spec.kernel_boot.kernel.disk_format == "kernel"
    assert spec.kernel_boot.ramdisk.image_id == ramdisk
    assert spec.kernel_boot.cmdline == "console=ttyS0 root=/dev/vda"
    assert not without.HasField("kernel_boot")


async def test_killed_compute_restarted_finishes_every_rebuild(bare_cloud: ComputeCloud) -> None:
    cloud = bare_cloud
    first = cloud.start_compute_process()
    stub = cloud.stub()
    made = await asyncio.gather(*(cloud.create(stub=stub) for _ in range(3)))
    ids = [m.meta.id for m in made]
    booted = await asyncio.gather(*(cloud.wait_final(i, 90) for i in ids))
    assert all(b.state == Instance.ACTIVE for b in booted), [b.fault.message for b in booted]
    other = await volume_harness.active_image(cloud.base, public=True)
    await asyncio.gather(*(stub.RebuildInstance(V.RebuildInstanceRequest(
        id=i, image_id=other), metadata=cloud.admin) for i in ids))
    # Killed once some rebuild recorded its new disk (and before all of them finished).
    async with asyncio.timeout(30):
        while True:
            ops, _ = await cloud.base.store.list_all(keys.OPERATIONS, operation_pb2.Operation)
            if not ops or any(o.value.progress.get(move.MOVE_ROOT) for o in ops):
                break
            await asyncio.sleep(0.01)
    cloud.kill(first)
    assert ops, "every rebuild finished before the kill: nothing was tested"

    cloud.start_compute_process()  # the same address; it adopts what the dead one ran
    done = [await cloud.wait_final(i, 90) for i in ids]
    async with asyncio.timeout(60):
        while any(d.task_id for d in done):
            await asyncio.sleep(0.2)
            done = [await cloud.wait_final(i, 90) for i in ids]
    counted = {name: [0, 0, 0] for name in NODES}
    for server, before in zip(done, booted, strict=True):
        assert server.state == Instance.ACTIVE, server.fault.message
        assert server.image_id == other and server.node == before.node
        assert server.root_volume_id != before.root_volume_id
        assert await allocations(cloud, server.meta.id) == {before.node: OLD}
        counted[before.node] = [a + b for a, b in zip(counted[before.node], OLD, strict=True)]
        assert await cloud.domain_state(server.node, server.meta.id) == "running"
    assert await node_usage(cloud) == {name: tuple(sizes) for name, sizes in counted.items()}
    await asyncio.gather(*(cloud.delete(i) for i in ids))
    await asyncio.gather(*(cloud.wait_gone(i) for i in ids))
    left = await cloud.wait_clean(ids)
    assert left.empty(), left


async def test_rebuild_keeps_data_volumes_and_refuses_a_boot_from_volume(
        cloud: ComputeCloud) -> None:
    server = await booted(cloud)
    stub = cloud.stub()
    data = await volume_on(cloud, server.node)
    await stub.AttachVolume(V.AttachVolumeRequest(instance_id=server.meta.id, volume_id=data),
                            metadata=cloud.admin)
    attached = await idle(cloud, server)
    assert [v.volume_id for v in attached.volumes[1:]] == [data], attached.fault.message
    macs = list((await domain(cloud, attached)).interface_macs)
    await stub.RebuildInstance(V.RebuildInstanceRequest(id=server.meta.id),
                               metadata=cloud.admin)
    done, _ = await follow(cloud, server.meta.id, (Instance.ACTIVE, Instance.ERROR))
    assert done.state == Instance.ACTIVE, done.fault.message
    assert [(v.volume_id, v.device_name) for v in done.volumes[1:]] == [(data, "vdb")]
    running = await domain(cloud, done)
    assert running.state == "running" and sorted(running.disk_targets) == ["vda", "vdb"]
    assert list(running.interface_macs) == macs
    kept = await cloud.base.stub().GetVolume(volume_pb2.GetVolumeRequest(id=data),
                                             metadata=cloud.admin)
    assert kept.state == volume_pb2.Volume.IN_USE

    boot = await cloud.base.stub().CreateVolume(volume_pb2.CreateVolumeRequest(
        volume=volume_pb2.Volume(meta=resource_pb2.ResourceMeta(name="boot"), size_gb=1,
                                 source_image_id=cloud.image_id, node=server.node)),
        metadata=cloud.admin)
    await volume_harness.wait_state(cloud.base.stub(), boot.meta.id, cloud.admin,
                                    {volume_pb2.Volume.AVAILABLE})
    shape = cloud.server()
    shape.ClearField("image_id")
    shape.boot_volume_id = boot.meta.id
    from_volume = await cloud.wait_final((await cloud.create(shape)).meta.id)
    assert from_volume.state == Instance.ACTIVE, from_volume.fault.message
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RebuildInstance(V.RebuildInstanceRequest(
            id=from_volume.meta.id, image_id=cloud.image_id), metadata=cloud.admin)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(refused.value) == "nubis.instance.volume_backed"
