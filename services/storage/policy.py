"""Who may call each StorageService RPC: the one place storage's authorization lives.

Images, volumes, snapshots and attachments belong to projects: readers read,
members change them, and the domain narrows everything to the caller's project
(public and shared images are readable beyond it; other nubis services read and
download any image, as an agent filling its node's image cache does). Storage pools are the
operator's: cloud-admins and other nubis services read them, cloud-admins
change them. The calls compute makes while it builds a server (root disks and
the attach/detach steps) take the `service` role or cloud-admin.
"""

from __future__ import annotations

from services.common import policy

SERVICE = "nubis.storage.v1.StorageService"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


TABLE: policy.PolicyTable = {
    # images
    _method("GetImage"): policy.reader_or_service(),
    _method("ListImages"): policy.reader(),
    _method("CreateImage"): policy.member(),
    _method("UpdateImage"): policy.member(),
    _method("DeleteImage"): policy.member(),
    _method("UploadImage"): policy.member(),
    _method("DownloadImage"): policy.reader_or_service(),
    _method("AddImageMember"): policy.member(),
    _method("RemoveImageMember"): policy.member(),
    # storage pools
    _method("GetStoragePool"): policy.service_or_cloud_admin(),
    _method("ListStoragePools"): policy.service_or_cloud_admin(),
    _method("CreateStoragePool"): policy.cloud_admin(),
    _method("UpdateStoragePool"): policy.cloud_admin(),
    _method("DeleteStoragePool"): policy.cloud_admin(),
    # volumes
    _method("GetVolume"): policy.reader_or_service(),
    _method("ListVolumes"): policy.reader(),
    _method("CreateVolume"): policy.member(),
    _method("UpdateVolume"): policy.member(),
    # Compute deletes an instance's root disk with it.
    _method("DeleteVolume"): policy.Rule(policy.Scope.PROJECT, policy.Role.MEMBER, services=True),
    _method("ExtendVolume"): policy.member(),
    _method("ResetVolumeState"): policy.cloud_admin(),
    _method("WatchVolumes"): policy.reader(),
    _method("CreateRootDisk"): policy.service_or_cloud_admin(),
    # snapshots
    _method("GetSnapshot"): policy.reader(),
    _method("ListSnapshots"): policy.reader(),
    _method("CreateSnapshot"): policy.member(),
    _method("UpdateSnapshot"): policy.member(),
    _method("DeleteSnapshot"): policy.member(),
    # volume attachments
    _method("GetVolumeAttachment"): policy.reader_or_service(),
    _method("ListVolumeAttachments"): policy.reader_or_service(),
    _method("ReserveVolume"): policy.service_or_cloud_admin(),
    _method("BeginAttach"): policy.service_or_cloud_admin(),
    _method("CompleteAttach"): policy.service_or_cloud_admin(),
    _method("BeginDetach"): policy.service_or_cloud_admin(),
    _method("CompleteDetach"): policy.service_or_cloud_admin(),
}
