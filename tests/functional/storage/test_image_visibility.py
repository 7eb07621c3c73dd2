"""Who sees which image: private, shared with member projects, public (cloud-admins only)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.storage.v1 import image_pb2

from services.storage import image
from tests.functional.storage.harness import MIB, Format, StorageWorld, raw_bytes, reason_of

Visibility = image_pb2.Image.Visibility


async def _listed(storage: StorageWorld, caller: str, filter_: str = "",
                  all_projects: bool = False) -> set[str]:
    found: set[str] = set()
    token = ""
    while True:
        page = await storage.stub.ListImages(image_pb2.ListImagesRequest(
            filter=filter_, page_size=50, page_token=token, all_projects=all_projects),
            metadata=storage.as_(caller))
        found |= {item.meta.id for item in page.images}
        token = page.next_page_token
        if not token:
            return found


async def _code_of_get(storage: StorageWorld, caller: str, image_id: str) -> grpc.StatusCode:
    try:
        await storage.stub.GetImage(image_pb2.GetImageRequest(id=image_id),
                                    metadata=storage.as_(caller))
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _update(image_id: str, paths: list[str], **fields: object) -> image_pb2.UpdateImageRequest:
    sent = image_pb2.Image(**fields)  # type: ignore[arg-type]
    sent.meta.id = image_id
    return image_pb2.UpdateImageRequest(image=sent,
                                        update_mask=field_mask_pb2.FieldMask(paths=paths))


async def test_private_image_is_its_project_s_alone(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB))
    assert done.visibility == Visibility.VISIBILITY_PRIVATE
    assert await _code_of_get(storage, "a_reader", done.meta.id) == grpc.StatusCode.OK
    assert await _code_of_get(storage, "b_admin", done.meta.id) == grpc.StatusCode.NOT_FOUND
    assert done.meta.id not in await _listed(storage, "b_admin")
    assert done.meta.id in await _listed(storage, "a_reader")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await storage.download(done.meta.id, "b_admin")
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    # Cloud-admins see every project's private images when they ask for all projects.
    assert done.meta.id in await _listed(storage, "cloud_admin", all_projects=True)
    # Other nubis services (an agent filling its cache) read and download any image.
    _, data = await storage.download(done.meta.id, "service")
    assert data == raw_bytes(MIB)


async def test_shared_image_reaches_its_members_only(storage: StorageWorld) -> None:
    done = await storage.active_image(raw_bytes(MIB))
    member = image_pb2.ImageMemberRequest(image_id=done.meta.id,
                                          project_id=storage.world.project_b)
    with pytest.raises(grpc.aio.AioRpcError) as private:
        await storage.stub.AddImageMember(member, metadata=storage.as_("a_member"))
    assert private.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await storage.stub.UpdateImage(_update(done.meta.id, ["visibility"],
                                           visibility=Visibility.VISIBILITY_SHARED),
                                   metadata=storage.as_("a_member"))
    assert await _code_of_get(storage, "b_admin", done.meta.id) == grpc.StatusCode.NOT_FOUND
    shared = await storage.stub.AddImageMember(member, metadata=storage.as_("a_member"))
    assert list(shared.member_project_ids) == [storage.world.project_b]
    assert await _code_of_get(storage, "b_admin", done.meta.id) == grpc.StatusCode.OK
    assert done.meta.id in await _listed(storage, "b_admin", "visibility=SHARED")
    _, data = await storage.download(done.meta.id, "b_admin")
    assert data == raw_bytes(MIB)
    # A volume of project B may be made from it now.
    await image.usable(storage.store, storage.world.project_b, done.meta.id)
    # Members use an image; they do not change, share or delete it.
    with pytest.raises(grpc.aio.AioRpcError) as not_owner:
        await storage.stub.UpdateImage(_update(done.meta.id, ["min_ram_mb"], min_ram_mb=1),
                                       metadata=storage.as_("b_admin"))
    assert (not_owner.value.code(), reason_of(not_owner.value)) == (
        grpc.StatusCode.PERMISSION_DENIED, image.NOT_OWNER)
    with pytest.raises(grpc.aio.AioRpcError) as no_delete:
        await storage.stub.DeleteImage(image_pb2.DeleteImageRequest(id=done.meta.id),
                                       metadata=storage.as_("b_admin"))
    assert no_delete.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await storage.stub.RemoveImageMember(member, metadata=storage.as_("a_member"))
    assert await _code_of_get(storage, "b_admin", done.meta.id) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await storage.stub.RemoveImageMember(member, metadata=storage.as_("a_member"))
    assert again.value.code() == grpc.StatusCode.NOT_FOUND


async def test_only_a_cloud_admin_makes_an_image_public(storage: StorageWorld) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await storage.create_image(visibility=Visibility.VISIBILITY_PUBLIC)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = await storage.active_image(raw_bytes(MIB))
    with pytest.raises(grpc.aio.AioRpcError) as update_refused:
        await storage.stub.UpdateImage(_update(done.meta.id, ["visibility"],
                                               visibility=Visibility.VISIBILITY_PUBLIC),
                                       metadata=storage.as_("a_admin"))
    assert update_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    public = await storage.stub.UpdateImage(_update(done.meta.id, ["visibility"],
                                                    visibility=Visibility.VISIBILITY_PUBLIC),
                                            metadata=storage.as_("cloud_admin"))
    assert public.visibility == Visibility.VISIBILITY_PUBLIC
    assert done.meta.id in await _listed(storage, "b_admin", "visibility=PUBLIC")
    _, data = await storage.download(done.meta.id, "b_admin")
    assert data == raw_bytes(MIB)
    made = await storage.create_image("cloud_admin", visibility=Visibility.VISIBILITY_PUBLIC)
    assert made.visibility == Visibility.VISIBILITY_PUBLIC


async def test_list_filters_and_pages(storage: StorageWorld) -> None:
    tag = "pages"
    made = [await storage.create_image(disk_format=Format.DISK_FORMAT_QCOW2,
                                       properties={"suite": tag}) for _ in range(3)]
    ids = {item.meta.id for item in made}
    assert await _listed(storage, "a_reader", f"property.suite={tag}") == ids
    assert await _listed(storage, "a_reader",
                         f"property.suite={tag} state=ACTIVE") == set()
    assert await _listed(storage, "a_reader",
                         f"property.suite={tag} state=QUEUED disk_format=QCOW2") == ids
    seen: list[str] = []
    token = ""
    while True:
        page = await storage.stub.ListImages(image_pb2.ListImagesRequest(
            filter=f"property.suite={tag}", page_size=1, page_token=token),
            metadata=storage.as_("a_reader"))
        seen += [item.meta.id for item in page.images]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(ids)
    for bad in ("property.=x", "colour=red", "state=HAPPY", "property.suite"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _listed(storage, "a_reader", bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad


async def test_update_with_a_mask_and_a_revision(storage: StorageWorld) -> None:
    made = await storage.create_image(min_disk_gb=1, properties={"os_distro": "debian"})
    changed = await storage.stub.UpdateImage(_named(made, "renamed"),
                                             metadata=storage.as_("a_member"))
    assert (changed.meta.name, changed.min_disk_gb, dict(changed.properties)) == (
        "renamed", 1, {"os_distro": "debian"})
    stale = _update(made.meta.id, ["min_disk_gb"], min_disk_gb=5)
    stale.image.meta.revision = made.meta.revision
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await storage.stub.UpdateImage(stale, metadata=storage.as_("a_member"))
    assert conflict.value.code() == grpc.StatusCode.ABORTED
    for paths in (["state"], ["checksum_sha256"], [], ["disk_format"]):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await storage.stub.UpdateImage(_update(made.meta.id, paths),
                                           metadata=storage.as_("a_member"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, paths


def _named(made: image_pb2.Image, name: str) -> image_pb2.UpdateImageRequest:
    request = _update(made.meta.id, ["meta.name"])
    request.image.meta.name = name
    return request
