"""Authorization rows of nubis.storage.v1.StorageService.

Images belong to projects: readers read and download, members create,
change, upload, share and delete; another project neither sees nor touches a
private image (NOT_FOUND). Other nubis services (the `service` role) read and
download any image, as an agent filling its node's image cache does. Only a
cloud-admin lists every project's images.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence

import grpc
from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import image_pb2

from services.common.settings import ServiceEndpoint
from services.storage import main
from tests.functional.authz.table import (
    DENIED,
    OK,
    Row,
    add_rows,
    add_service,
    cloud_only,
    expect,
    project_read,
    project_write,
)
from tests.functional.authz.world import Service, World, start_service

SERVICE = "nubis.storage.v1.StorageService"
P = image_pb2
DATA = hashlib.sha256(b"authz").digest() * 128  # 4 KiB, probed as raw
Visibility = P.Image.Visibility


async def _start(world: World) -> Service:
    return await start_service(main.build, world.store, world.settings,
                               ServiceEndpoint(host="127.0.0.1", port=0))


add_service(SERVICE, _start)


def _upload_messages(image_id: str) -> list[P.UploadImageRequest]:
    return [P.UploadImageRequest(header=P.ImageUploadHeader(
        image_id=image_id, size_bytes=len(DATA),
        checksum_sha256=hashlib.sha256(DATA).hexdigest())),
        P.UploadImageRequest(chunk=DATA)]


async def _image_in_a(world: World, *, active: bool = False,
                      visibility: int = Visibility.VISIBILITY_PRIVATE,
                      members: Sequence[str] = ()) -> str:
    """An image of project A made by the cloud-admin (uploaded if `active`)."""
    made = P.Image(meta=resource_pb2.ResourceMeta(name=f"i-{uuid.uuid4().hex[:6]}",
                                                  project_id=world.project_a),
                   disk_format=P.Image.DISK_FORMAT_RAW)
    made.visibility = visibility  # type: ignore[assignment]
    reply = await world.call(SERVICE, "CreateImage", P.CreateImageRequest(image=made),
                             "cloud_admin")
    assert isinstance(reply, P.Image)
    image_id = reply.meta.id
    if active:
        await world.call(SERVICE, "UploadImage", _upload_messages(image_id), "cloud_admin")
    for project_id in members:
        await world.call(SERVICE, "AddImageMember", P.ImageMemberRequest(
            image_id=image_id, project_id=project_id), "cloud_admin")
    return image_id


def _with_service(codes: dict[str, grpc.StatusCode]) -> dict[str, grpc.StatusCode]:
    return {**codes, "service": OK}


def _no_foreign_private(world: World, caller: str, reply: message.Message) -> None:
    """A listing shows another project's image only if it is public or shared with the caller."""
    assert isinstance(reply, P.ListImagesResponse)
    own = {"a_admin": world.project_a, "a_member": world.project_a, "a_reader": world.project_a,
           "b_admin": world.project_b}.get(caller)
    if own is None:
        return
    for item in reply.images:
        assert item.meta.project_id == own or item.visibility == Visibility.VISIBILITY_PUBLIC \
            or own in item.member_project_ids, (caller, item.meta.id)


async def _get(world: World) -> message.Message:
    return P.GetImageRequest(id=await _image_in_a(world))


async def _list(world: World) -> message.Message:
    await _image_in_a(world)
    return P.ListImagesRequest(page_size=1000)


async def _list_all(world: World) -> message.Message:
    return P.ListImagesRequest(all_projects=True, page_size=5)


async def _create_own(world: World) -> message.Message:
    return P.CreateImageRequest(image=P.Image(
        meta=resource_pb2.ResourceMeta(name="mine"), disk_format=P.Image.DISK_FORMAT_QCOW2))


async def _create_in_a(world: World) -> message.Message:
    return P.CreateImageRequest(image=P.Image(
        meta=resource_pb2.ResourceMeta(name="theirs", project_id=world.project_a),
        disk_format=P.Image.DISK_FORMAT_QCOW2))


async def _update(world: World) -> message.Message:
    sent = P.Image(min_ram_mb=256)
    sent.meta.id = await _image_in_a(world)
    return P.UpdateImageRequest(image=sent,
                                update_mask=field_mask_pb2.FieldMask(paths=["min_ram_mb"]))


async def _delete(world: World) -> message.Message:
    return P.DeleteImageRequest(id=await _image_in_a(world, active=True))


async def _upload(world: World) -> Sequence[message.Message]:
    return _upload_messages(await _image_in_a(world))


async def _download(world: World) -> message.Message:
    return P.DownloadImageRequest(id=await _image_in_a(world, active=True))


async def _add_member(world: World) -> message.Message:
    image_id = await _image_in_a(world, visibility=Visibility.VISIBILITY_SHARED)
    return P.ImageMemberRequest(image_id=image_id, project_id=str(uuid.uuid4()))


async def _remove_member(world: World) -> message.Message:
    member = str(uuid.uuid4())
    image_id = await _image_in_a(world, visibility=Visibility.VISIBILITY_SHARED,
                                 members=[member])
    return P.ImageMemberRequest(image_id=image_id, project_id=member)


add_rows(
    Row(SERVICE, "GetImage", _get, _with_service(project_read())),
    Row(SERVICE, "ListImages", _list, expect(), check=_no_foreign_private),
    Row(SERVICE, "ListImages", _list_all, cloud_only(), case="all_projects"),
    Row(SERVICE, "CreateImage", _create_own, expect(a_reader=DENIED), case="own project"),
    Row(SERVICE, "CreateImage", _create_in_a, project_write(), case="project A"),
    Row(SERVICE, "UpdateImage", _update, project_write()),
    Row(SERVICE, "DeleteImage", _delete, project_write()),
    Row(SERVICE, "UploadImage", _upload, project_write()),
    Row(SERVICE, "DownloadImage", _download, _with_service(project_read())),
    Row(SERVICE, "AddImageMember", _add_member, project_write()),
    Row(SERVICE, "RemoveImageMember", _remove_member, project_write()),
)
