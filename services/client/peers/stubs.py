"""The typed clients of the services other services call, every RPC with its deadline.

Each RPC is declared once, here, with the seconds the whole call may take
(retries included) and whether it is idempotent (see peers.rpc). A service
whose API grows declares the new RPC here too: a test compares these
declarations with the protos, so none is forgotten.
"""

from __future__ import annotations

from nubis.compute.v1 import compute_service_pb2  # noqa: F401 - registers the service
from nubis.compute.v1 import flavor_pb2 as flv
from nubis.compute.v1 import instance_action_pb2 as act
from nubis.compute.v1 import instance_pb2 as inst
from nubis.compute.v1 import instance_requests_pb2 as ireq
from nubis.compute.v1 import instance_verbs_pb2 as verb
from nubis.compute.v1 import keypair_pb2 as kp
from nubis.identity.v1 import identity_pb2 as idp
from nubis.network.v1 import floating_ip_pb2 as fip
from nubis.network.v1 import network_pb2 as netp
from nubis.network.v1 import network_service_pb2  # noqa: F401 - registers the service
from nubis.network.v1 import port_pb2 as portp
from nubis.network.v1 import router_pb2 as rtp
from nubis.network.v1 import security_group_pb2 as sgp
from nubis.network.v1 import subnet_pb2 as subp
from nubis.scheduler.v1 import scheduler_pb2 as sch
from nubis.storage.v1 import attachment_pb2 as att
from nubis.storage.v1 import image_pb2 as img
from nubis.storage.v1 import pool_pb2 as pool
from nubis.storage.v1 import snapshot_pb2 as snap
from nubis.storage.v1 import volume_pb2 as vol

from services.client import image_stream
from services.client.peers.rpc import Rpc, ServerStream, ServiceClient

# Deadlines by kind of call. Reads and small writes are one etcd round trip
# or a few; a claim may re-plan on fresh data for a while under contention.
READ = 5.0
WRITE = 10.0
LOGIN = 10.0  # an argon2 hash on a busy identity
CLAIM = 35.0  # above the scheduler's own claim_timeout (30 s), so its answer arrives
BIND = 35.0  # above network's realize_timeout (30 s): a bind waits for the node
# A whole image's bytes: within a node's fetch_image task (soft limit 540 s), which
# passes what is left of its own deadline.
DOWNLOAD = 540.0
# A create waits for its project's turn to reserve quota (compute's CREATE_PATIENCE, 30 s).
ADMIT = 35.0
# A console log is read from the node's agent.
CONSOLE = 30.0
# A watch runs until the caller stops it; the deadline only bounds one stream.
WATCH = 3600.0


class IdentityClient(ServiceClient):
    """nubis.identity.v1.IdentityService, reached at the one configured address."""

    NAME = "identity"
    SERVICE = "nubis.identity.v1.IdentityService"

    # A repeated login only issues another token.
    Authenticate = Rpc(idp.AuthenticateRequest, idp.AuthenticateResponse, timeout=LOGIN,
                       idempotent=True, authenticated=False)
    RevokeToken = Rpc(idp.RevokeTokenRequest, idp.RevokeTokenResponse, timeout=WRITE,
                      idempotent=True)
    ListSigningKeys = Rpc(idp.ListSigningKeysRequest, idp.ListSigningKeysResponse,
                          timeout=READ, idempotent=True, authenticated=False)
    CreateProject = Rpc(idp.CreateProjectRequest, idp.Project, timeout=WRITE)
    GetProject = Rpc(idp.GetProjectRequest, idp.Project, timeout=READ, idempotent=True)
    ListProjects = Rpc(idp.ListProjectsRequest, idp.ListProjectsResponse, timeout=READ,
                       idempotent=True)
    UpdateProject = Rpc(idp.UpdateProjectRequest, idp.Project, timeout=WRITE)
    DeleteProject = Rpc(idp.DeleteProjectRequest, idp.DeleteProjectResponse, timeout=WRITE)
    CreateUser = Rpc(idp.CreateUserRequest, idp.User, timeout=LOGIN)
    GetUser = Rpc(idp.GetUserRequest, idp.User, timeout=READ, idempotent=True)
    ListUsers = Rpc(idp.ListUsersRequest, idp.ListUsersResponse, timeout=READ, idempotent=True)
    UpdateUser = Rpc(idp.UpdateUserRequest, idp.User, timeout=LOGIN)
    DeleteUser = Rpc(idp.DeleteUserRequest, idp.DeleteUserResponse, timeout=WRITE)
    # Granting a held role again is a no-op.
    GrantRole = Rpc(idp.GrantRoleRequest, idp.RoleAssignment, timeout=WRITE, idempotent=True)
    RevokeRole = Rpc(idp.RevokeRoleRequest, idp.RevokeRoleResponse, timeout=WRITE)
    ListRoleAssignments = Rpc(idp.ListRoleAssignmentsRequest, idp.ListRoleAssignmentsResponse,
                              timeout=READ, idempotent=True)
    GetQuota = Rpc(idp.GetQuotaRequest, idp.Quota, timeout=READ, idempotent=True)
    UpdateQuota = Rpc(idp.UpdateQuotaRequest, idp.Quota, timeout=WRITE)
    GetUsage = Rpc(idp.GetUsageRequest, idp.Usage, timeout=READ, idempotent=True)
    GetDefaultQuota = Rpc(idp.GetDefaultQuotaRequest, idp.Quota, timeout=READ, idempotent=True)
    UpdateDefaultQuota = Rpc(idp.UpdateDefaultQuotaRequest, idp.Quota, timeout=WRITE)
    ListEndpoints = Rpc(idp.ListEndpointsRequest, idp.ListEndpointsResponse, timeout=READ,
                        idempotent=True)


class SchedulerClient(ServiceClient):
    """nubis.scheduler.v1.SchedulerService: nodes, placement claims, server groups."""

    NAME = "scheduler"
    SERVICE = "nubis.scheduler.v1.SchedulerService"

    ListNodes = Rpc(sch.ListNodesRequest, sch.ListNodesResponse, timeout=READ, idempotent=True)
    GetNode = Rpc(sch.GetNodeRequest, sch.Node, timeout=READ, idempotent=True)
    UpdateNode = Rpc(sch.UpdateNodeRequest, sch.Node, timeout=WRITE)
    GetDefaultAllocationRatios = Rpc(sch.GetDefaultAllocationRatiosRequest,
                                     sch.DefaultAllocationRatios, timeout=READ, idempotent=True)
    UpdateDefaultAllocationRatios = Rpc(sch.UpdateDefaultAllocationRatiosRequest,
                                        sch.DefaultAllocationRatios, timeout=WRITE)
    # A claim is keyed by its consumer ids: a repeat returns the first destinations.
    SelectDestinations = Rpc(sch.SelectDestinationsRequest, sch.SelectDestinationsResponse,
                             timeout=CLAIM, idempotent=True)
    GetAllocations = Rpc(sch.GetAllocationsRequest, sch.ConsumerAllocations, timeout=READ,
                         idempotent=True)
    # A repeat of a release that landed answers NOT_FOUND: not retried blindly.
    ReleaseAllocations = Rpc(sch.ReleaseAllocationsRequest, sch.ReleaseAllocationsResponse,
                             timeout=WRITE)
    MoveAllocations = Rpc(sch.MoveAllocationsRequest, sch.ConsumerAllocations, timeout=CLAIM)
    CreateServerGroup = Rpc(sch.CreateServerGroupRequest, sch.ServerGroup, timeout=WRITE)
    GetServerGroup = Rpc(sch.GetServerGroupRequest, sch.ServerGroup, timeout=READ,
                         idempotent=True)
    ListServerGroups = Rpc(sch.ListServerGroupsRequest, sch.ListServerGroupsResponse,
                           timeout=READ, idempotent=True)
    DeleteServerGroup = Rpc(sch.DeleteServerGroupRequest, sch.DeleteServerGroupResponse,
                            timeout=WRITE)


class StorageClient(ServiceClient):
    """nubis.storage.v1.StorageService: images, pools, volumes, snapshots, attachments.

    UploadImage (a client stream) is not declared: no service uploads an image.
    """

    NAME = "storage"
    SERVICE = "nubis.storage.v1.StorageService"

    GetImage = Rpc(img.GetImageRequest, img.Image, timeout=READ, idempotent=True)
    ListImages = Rpc(img.ListImagesRequest, img.ListImagesResponse, timeout=READ,
                     idempotent=True)
    CreateImage = Rpc(img.CreateImageRequest, img.Image, timeout=WRITE)
    UpdateImage = Rpc(img.UpdateImageRequest, img.Image, timeout=WRITE)
    DeleteImage = Rpc(img.DeleteImageRequest, img.DeleteImageResponse, timeout=WRITE)
    # The record, then the bytes: a node's agent fills its image cache from it. Chunks
    # arrive as views of the bytes received (image_stream), never copied by protobuf.
    DownloadImage = ServerStream(img.DownloadImageRequest, img.DownloadImageResponse,
                                 timeout=DOWNLOAD, idempotent=True,
                                 deserializer=image_stream.parse_download)
    AddImageMember = Rpc(img.ImageMemberRequest, img.Image, timeout=WRITE, idempotent=True)
    RemoveImageMember = Rpc(img.ImageMemberRequest, img.Image, timeout=WRITE)
    GetStoragePool = Rpc(pool.GetStoragePoolRequest, pool.StoragePool, timeout=READ,
                         idempotent=True)
    ListStoragePools = Rpc(pool.ListStoragePoolsRequest, pool.ListStoragePoolsResponse,
                           timeout=READ, idempotent=True)
    CreateStoragePool = Rpc(pool.CreateStoragePoolRequest, pool.StoragePool, timeout=WRITE)
    UpdateStoragePool = Rpc(pool.UpdateStoragePoolRequest, pool.StoragePool, timeout=WRITE)
    DeleteStoragePool = Rpc(pool.DeleteStoragePoolRequest, pool.DeleteStoragePoolResponse,
                            timeout=WRITE)
    GetVolume = Rpc(vol.GetVolumeRequest, vol.Volume, timeout=READ, idempotent=True)
    ListVolumes = Rpc(vol.ListVolumesRequest, vol.ListVolumesResponse, timeout=READ,
                      idempotent=True)
    CreateVolume = Rpc(vol.CreateVolumeRequest, vol.Volume, timeout=WRITE)
    UpdateVolume = Rpc(vol.UpdateVolumeRequest, vol.Volume, timeout=WRITE)
    DeleteVolume = Rpc(vol.DeleteVolumeRequest, vol.Volume, timeout=WRITE)
    ExtendVolume = Rpc(vol.ExtendVolumeRequest, vol.Volume, timeout=WRITE)
    ResetVolumeState = Rpc(vol.ResetVolumeStateRequest, vol.Volume, timeout=WRITE)
    WatchVolumes = ServerStream(vol.WatchVolumesRequest, vol.VolumeEvent, timeout=WATCH,
                                idempotent=True)
    # One root disk per instance: a repeat returns the disk the first call made.
    CreateRootDisk = Rpc(vol.CreateRootDiskRequest, vol.Volume, timeout=WRITE,
                         idempotent=True)
    GetSnapshot = Rpc(snap.GetSnapshotRequest, snap.Snapshot, timeout=READ, idempotent=True)
    ListSnapshots = Rpc(snap.ListSnapshotsRequest, snap.ListSnapshotsResponse, timeout=READ,
                        idempotent=True)
    CreateSnapshot = Rpc(snap.CreateSnapshotRequest, snap.Snapshot, timeout=WRITE)
    UpdateSnapshot = Rpc(snap.UpdateSnapshotRequest, snap.Snapshot, timeout=WRITE)
    DeleteSnapshot = Rpc(snap.DeleteSnapshotRequest, snap.Snapshot, timeout=WRITE)
    GetVolumeAttachment = Rpc(att.GetVolumeAttachmentRequest, att.VolumeAttachment,
                              timeout=READ, idempotent=True)
    ListVolumeAttachments = Rpc(att.ListVolumeAttachmentsRequest,
                                att.ListVolumeAttachmentsResponse, timeout=READ,
                                idempotent=True)
    # The same (volume, instance) gets the same attachment; a step repeated
    # on an attachment already in its target state changes nothing.
    ReserveVolume = Rpc(att.ReserveVolumeRequest, att.VolumeAttachment, timeout=WRITE,
                        idempotent=True)
    BeginAttach = Rpc(att.BeginAttachRequest, att.VolumeAttachment, timeout=WRITE,
                      idempotent=True)
    CompleteAttach = Rpc(att.CompleteAttachRequest, att.VolumeAttachment, timeout=WRITE,
                         idempotent=True)
    BeginDetach = Rpc(att.BeginDetachRequest, att.VolumeAttachment, timeout=WRITE,
                      idempotent=True)
    CompleteDetach = Rpc(att.CompleteDetachRequest, vol.Volume, timeout=WRITE)


class NetworkClient(ServiceClient):
    """nubis.network.v1.NetworkService: networks and ports for a server's NICs, and the rest."""

    NAME = "network"
    SERVICE = "nubis.network.v1.NetworkService"

    GetNetwork = Rpc(netp.GetNetworkRequest, netp.Network, timeout=READ, idempotent=True)
    ListNetworks = Rpc(netp.ListNetworksRequest, netp.ListNetworksResponse, timeout=READ,
                       idempotent=True)
    CreateNetwork = Rpc(netp.CreateNetworkRequest, netp.Network, timeout=WRITE)
    UpdateNetwork = Rpc(netp.UpdateNetworkRequest, netp.Network, timeout=WRITE)
    DeleteNetwork = Rpc(netp.DeleteNetworkRequest, netp.DeleteNetworkResponse, timeout=WRITE)
    GetNetworkIpAvailability = Rpc(netp.GetNetworkIpAvailabilityRequest,
                                   netp.NetworkIpAvailability, timeout=READ, idempotent=True)
    GetSubnet = Rpc(subp.GetSubnetRequest, subp.Subnet, timeout=READ, idempotent=True)
    ListSubnets = Rpc(subp.ListSubnetsRequest, subp.ListSubnetsResponse, timeout=READ,
                      idempotent=True)
    CreateSubnet = Rpc(subp.CreateSubnetRequest, subp.Subnet, timeout=WRITE)
    UpdateSubnet = Rpc(subp.UpdateSubnetRequest, subp.Subnet, timeout=WRITE)
    DeleteSubnet = Rpc(subp.DeleteSubnetRequest, subp.DeleteSubnetResponse, timeout=WRITE)
    GetPort = Rpc(portp.GetPortRequest, portp.Port, timeout=READ, idempotent=True)
    ListPorts = Rpc(portp.ListPortsRequest, portp.ListPortsResponse, timeout=READ,
                    idempotent=True)
    # With a request_id a retry returns the first port (never two ports, two addresses).
    CreatePort = Rpc(portp.CreatePortRequest, portp.Port, timeout=WRITE)
    UpdatePort = Rpc(portp.UpdatePortRequest, portp.Port, timeout=WRITE)
    # A repeat of a delete that landed answers NOT_FOUND: not retried blindly. A bound
    # port's node is realized again before the answer, hence the bind deadline.
    DeletePort = Rpc(portp.DeletePortRequest, portp.DeletePortResponse, timeout=BIND)
    WatchPorts = ServerStream(portp.WatchPortsRequest, portp.PortEvent, timeout=3600)
    # Binding the same port to the same node and device again changes nothing; the
    # deadline covers the agent realizing the network (networking.realize_timeout).
    BindPort = Rpc(portp.BindPortRequest, portp.Port, timeout=BIND, idempotent=True)
    UnbindPort = Rpc(portp.UnbindPortRequest, portp.Port, timeout=BIND, idempotent=True)
    GetRouter = Rpc(rtp.GetRouterRequest, rtp.Router, timeout=READ, idempotent=True)
    ListRouters = Rpc(rtp.ListRoutersRequest, rtp.ListRoutersResponse, timeout=READ,
                      idempotent=True)
    CreateRouter = Rpc(rtp.CreateRouterRequest, rtp.Router, timeout=BIND)
    UpdateRouter = Rpc(rtp.UpdateRouterRequest, rtp.Router, timeout=BIND)
    DeleteRouter = Rpc(rtp.DeleteRouterRequest, rtp.DeleteRouterResponse, timeout=BIND)
    AddRouterInterface = Rpc(rtp.AddRouterInterfaceRequest, rtp.Router, timeout=BIND)
    RemoveRouterInterface = Rpc(rtp.RemoveRouterInterfaceRequest, rtp.Router, timeout=BIND)
    GetFloatingIp = Rpc(fip.GetFloatingIpRequest, fip.FloatingIp, timeout=READ,
                        idempotent=True)
    ListFloatingIps = Rpc(fip.ListFloatingIpsRequest, fip.ListFloatingIpsResponse,
                          timeout=READ, idempotent=True)
    CreateFloatingIp = Rpc(fip.CreateFloatingIpRequest, fip.FloatingIp, timeout=WRITE)
    UpdateFloatingIp = Rpc(fip.UpdateFloatingIpRequest, fip.FloatingIp, timeout=WRITE)
    DeleteFloatingIp = Rpc(fip.DeleteFloatingIpRequest, fip.DeleteFloatingIpResponse,
                           timeout=BIND)
    AssociateFloatingIp = Rpc(fip.AssociateFloatingIpRequest, fip.FloatingIp, timeout=BIND)
    DisassociateFloatingIp = Rpc(fip.DisassociateFloatingIpRequest, fip.FloatingIp,
                                 timeout=BIND)
    GetSecurityGroup = Rpc(sgp.GetSecurityGroupRequest, sgp.SecurityGroup, timeout=READ,
                           idempotent=True)
    ListSecurityGroups = Rpc(sgp.ListSecurityGroupsRequest, sgp.ListSecurityGroupsResponse,
                             timeout=READ, idempotent=True)
    CreateSecurityGroup = Rpc(sgp.CreateSecurityGroupRequest, sgp.SecurityGroup,
                              timeout=WRITE)
    UpdateSecurityGroup = Rpc(sgp.UpdateSecurityGroupRequest, sgp.SecurityGroup,
                              timeout=WRITE)
    DeleteSecurityGroup = Rpc(sgp.DeleteSecurityGroupRequest, sgp.DeleteSecurityGroupResponse,
                              timeout=WRITE)
    GetSecurityGroupRule = Rpc(sgp.GetSecurityGroupRuleRequest, sgp.SecurityGroupRule,
                               timeout=READ, idempotent=True)
    ListSecurityGroupRules = Rpc(sgp.ListSecurityGroupRulesRequest,
                                 sgp.ListSecurityGroupRulesResponse, timeout=READ,
                                 idempotent=True)
    # A rule change is pushed to every bound port of the group before the answer.
    CreateSecurityGroupRule = Rpc(sgp.CreateSecurityGroupRuleRequest, sgp.SecurityGroupRule,
                                  timeout=BIND)
    DeleteSecurityGroupRule = Rpc(sgp.DeleteSecurityGroupRuleRequest,
                                  sgp.DeleteSecurityGroupRuleResponse, timeout=BIND)


class ComputeClient(ServiceClient):
    """nubis.compute.v1.ComputeService: flavors, key pairs, servers and their verbs.

    No service calls compute; the SDK (services.client.sdk) does. The verbs are
    asynchronous: each answers with the instance at once, its task state set.
    A verb has no request_id, so one that was sent is not retried blindly (a
    repeat would answer FAILED_PRECONDITION busy, or act twice).
    """

    NAME = "compute"
    SERVICE = "nubis.compute.v1.ComputeService"

    GetFlavor = Rpc(flv.GetFlavorRequest, flv.Flavor, timeout=READ, idempotent=True)
    ListFlavors = Rpc(flv.ListFlavorsRequest, flv.ListFlavorsResponse, timeout=READ,
                      idempotent=True)
    CreateFlavor = Rpc(flv.CreateFlavorRequest, flv.Flavor, timeout=WRITE)
    UpdateFlavor = Rpc(flv.UpdateFlavorRequest, flv.Flavor, timeout=WRITE)
    DeleteFlavor = Rpc(flv.DeleteFlavorRequest, flv.DeleteFlavorResponse, timeout=WRITE)
    # Granting access a project has, or taking away access it lacks, changes nothing.
    AddFlavorAccess = Rpc(flv.FlavorAccessRequest, flv.Flavor, timeout=WRITE, idempotent=True)
    RemoveFlavorAccess = Rpc(flv.FlavorAccessRequest, flv.Flavor, timeout=WRITE,
                             idempotent=True)
    GetKeyPair = Rpc(kp.GetKeyPairRequest, kp.KeyPair, timeout=READ, idempotent=True)
    ListKeyPairs = Rpc(kp.ListKeyPairsRequest, kp.ListKeyPairsResponse, timeout=READ,
                       idempotent=True)
    CreateKeyPair = Rpc(kp.CreateKeyPairRequest, kp.CreateKeyPairResponse, timeout=WRITE)
    UpdateKeyPair = Rpc(kp.UpdateKeyPairRequest, kp.KeyPair, timeout=WRITE)
    DeleteKeyPair = Rpc(kp.DeleteKeyPairRequest, kp.DeleteKeyPairResponse, timeout=WRITE)
    GetInstance = Rpc(ireq.GetInstanceRequest, inst.Instance, timeout=READ, idempotent=True)
    ListInstances = Rpc(ireq.ListInstancesRequest, ireq.ListInstancesResponse, timeout=READ,
                        idempotent=True)
    # With a request_id a retry returns the instance the first call made.
    CreateInstance = Rpc(ireq.CreateInstanceRequest, inst.Instance, timeout=ADMIT)
    UpdateInstance = Rpc(ireq.UpdateInstanceRequest, inst.Instance, timeout=WRITE)
    # Deleting an instance being deleted answers it again.
    DeleteInstance = Rpc(ireq.DeleteInstanceRequest, inst.Instance, timeout=WRITE,
                         idempotent=True)
    WatchInstances = ServerStream(ireq.WatchInstancesRequest, ireq.InstanceEvent,
                                  timeout=WATCH, idempotent=True)
    StartInstance = Rpc(verb.StartInstanceRequest, inst.Instance, timeout=WRITE)
    StopInstance = Rpc(verb.StopInstanceRequest, inst.Instance, timeout=WRITE)
    RebootInstance = Rpc(verb.RebootInstanceRequest, inst.Instance, timeout=WRITE)
    ResizeInstance = Rpc(verb.ResizeInstanceRequest, inst.Instance, timeout=WRITE)
    ConfirmResize = Rpc(verb.ConfirmResizeRequest, inst.Instance, timeout=WRITE)
    RevertResize = Rpc(verb.RevertResizeRequest, inst.Instance, timeout=WRITE)
    MigrateInstance = Rpc(verb.MigrateInstanceRequest, inst.Instance, timeout=WRITE)
    LiveMigrateInstance = Rpc(verb.LiveMigrateInstanceRequest, inst.Instance, timeout=WRITE)
    EvacuateInstance = Rpc(verb.EvacuateInstanceRequest, inst.Instance, timeout=WRITE)
    RebuildInstance = Rpc(verb.RebuildInstanceRequest, inst.Instance, timeout=WRITE)
    ResetInstanceState = Rpc(verb.ResetInstanceStateRequest, inst.Instance, timeout=WRITE)
    GetConsoleLog = Rpc(verb.GetConsoleLogRequest, verb.GetConsoleLogResponse,
                        timeout=CONSOLE, idempotent=True)
    AttachVolume = Rpc(verb.AttachVolumeRequest, inst.Instance, timeout=WRITE)
    DetachVolume = Rpc(verb.DetachVolumeRequest, inst.Instance, timeout=WRITE)
    AttachPort = Rpc(verb.AttachPortRequest, inst.Instance, timeout=WRITE)
    DetachPort = Rpc(verb.DetachPortRequest, inst.Instance, timeout=WRITE)
    ListInstanceActions = Rpc(act.ListInstanceActionsRequest, act.ListInstanceActionsResponse,
                              timeout=READ, idempotent=True)
    GetInstanceAction = Rpc(act.GetInstanceActionRequest, act.InstanceAction, timeout=READ,
                            idempotent=True)


# Every typed client, for the test that holds them to the protos.
CLIENTS: tuple[type[ServiceClient], ...] = (IdentityClient, SchedulerClient, StorageClient,
                                             NetworkClient, ComputeClient)
