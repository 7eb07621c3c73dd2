"""The typed clients of the services other services call, every RPC with its deadline.

Each RPC is declared once, here, with the seconds the whole call may take
(retries included) and whether it is idempotent (see peers.rpc). A service
whose API grows declares the new RPC here too: a test compares these
declarations with the protos, so none is forgotten.
"""

from __future__ import annotations

from nubis.identity.v1 import identity_pb2 as idp
from nubis.scheduler.v1 import scheduler_pb2 as sch

from services.client.peers.rpc import Rpc, ServiceClient

# Deadlines by kind of call. Reads and small writes are one etcd round trip
# or a few; a claim may re-plan on fresh data for a while under contention.
READ = 5.0
WRITE = 10.0
LOGIN = 10.0  # an argon2 hash on a busy identity
CLAIM = 35.0  # above the scheduler's own claim_timeout (30 s), so its answer arrives


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


# Every typed client, for the test that holds them to the protos.
CLIENTS: tuple[type[ServiceClient], ...] = (IdentityClient, SchedulerClient)
