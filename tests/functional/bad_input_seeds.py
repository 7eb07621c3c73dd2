"""A valid request for every implemented RPC, aimed at one caller's fuzz target.

tests/functional/test_bad_input.py breaks one field at a time of these
requests, so each check after the first a request meets also sees bad input.
Every seed names only the caller's `Target` (or resources made for the seed),
never the records the test protects.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf import field_mask_pb2, message
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    flavor_pb2,
    instance_action_pb2,
    instance_pb2,
    instance_requests_pb2,
    instance_verbs_pb2,
    keypair_pb2,
)
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    network_pb2,
    port_pb2,
    router_pb2,
    security_group_pb2,
    subnet_pb2,
)
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import attachment_pb2, image_pb2, pool_pb2, snapshot_pb2, volume_pb2

from services.common import quota, resources
from services.common.store import Txn
from services.compute import keys as compute_keys
from services.storage import keys as storage_keys
from tests.functional import request_fuzz
from tests.functional.authz.world import PASSWORD, World

IDENTITY = "nubis.identity.v1.IdentityService"
SCHEDULER = "nubis.scheduler.v1.SchedulerService"
STORAGE = "nubis.storage.v1.StorageService"
NODES = ("fuzz-node-1", "fuzz-node-2")
SMALL = scheduler_pb2.Resources(vcpus=1, memory_mb=64, disk_gb=1)
I = identity_pb2  # noqa: E741 - the usual short alias of a generated module
S = scheduler_pb2
G = image_pb2  # G for Glance: storage's images
IMAGE_BYTES = hashlib.sha256(b"fuzz").digest() * 64  # 2 KiB, probed as raw


@dataclass(frozen=True)
class Target:
    """The resources one caller's seeds name, and the ids and names its fuzz draws from.

    The drawn ones are other resources than the seeds' (a fuzzed request may
    delete what it names), so every seed still means what it says late in the run.
    """

    project: str
    project_name: str
    user: str
    user_name: str
    group: str
    consumer: str
    drawn_ids: tuple[str, ...]
    drawn_names: tuple[str, ...]

    @functools.cached_property
    def strategies(self) -> request_fuzz.RequestStrategies:
        # Built once: the strategies cache what they derive from each descriptor.
        return request_fuzz.RequestStrategies(
            self.drawn_ids, (*self.drawn_names, *NODES, "member", "reader", "admin"))


Seed = Callable[[World, Target], Awaitable[message.Message]]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def _meta(*, id: str = "", name: str = "", project_id: str = "",
          description: str = "") -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(id=id, name=name, project_id=project_id,
                                     description=description)


async def group(world: World, project_id: str, caller: str) -> str:
    """A server group in `project_id`, created by `caller`."""
    made = S.ServerGroup(meta=_meta(name=_name("g"), project_id=project_id),
                         policy=S.SOFT_ANTI_AFFINITY)
    reply = await world.call(SCHEDULER, "CreateServerGroup",
                             S.CreateServerGroupRequest(server_group=made), caller)
    assert isinstance(reply, S.ServerGroup)
    return reply.meta.id


async def placed(world: World, project_id: str) -> str:
    """A consumer holding a small allocation on the first node (placed by the cloud-admin)."""
    # A fuzzed UpdateDefaultAllocationRatios may have left the cloud's ratios tiny.
    await world.call(SCHEDULER, "UpdateDefaultAllocationRatios",
                     S.UpdateDefaultAllocationRatiosRequest(
                         default_allocation_ratios=S.DefaultAllocationRatios(
                             ratios=S.AllocationRatios(cpu=16.0, ram=1.5, disk=1.0)),
                         update_mask=_mask("ratios")), "cloud_admin")
    consumer = str(uuid.uuid4())
    await world.call(SCHEDULER, "SelectDestinations", S.SelectDestinationsRequest(
        spec=S.RequestSpec(resources=SMALL, consumer_ids=[consumer], avoid_nodes=[NODES[1]],
                           project_id=project_id)), "cloud_admin")
    return consumer


async def _authenticate(world: World, target: Target) -> message.Message:
    return I.AuthenticateRequest(username=target.user_name, password=PASSWORD,
                                 project=target.project_name)


async def _revoke_token(world: World, target: Target) -> message.Message:
    return I.RevokeTokenRequest(token_id=str(uuid.uuid4()))


async def _create_project(world: World, target: Target) -> message.Message:
    return I.CreateProjectRequest(project=I.Project(meta=_meta(name=_name("p"))),
                                  request_id=_name("r"))


async def _update_project(world: World, target: Target) -> message.Message:
    return I.UpdateProjectRequest(
        project=I.Project(meta=_meta(id=target.project, description="fuzzed")),
        update_mask=_mask("meta.description"))


async def _delete_project(world: World, target: Target) -> message.Message:
    return I.DeleteProjectRequest(id=await world.make_project(_name("gone")))


async def _create_user(world: World, target: Target) -> message.Message:
    return I.CreateUserRequest(user=I.User(meta=_meta(name=_name("u"))),
                               password="a long enough password", request_id=_name("r"))


async def _update_user(world: World, target: Target) -> message.Message:
    return I.UpdateUserRequest(user=I.User(meta=_meta(id=target.user, description="fuzzed")),
                               update_mask=_mask("meta.description"))


async def _delete_user(world: World, target: Target) -> message.Message:
    return I.DeleteUserRequest(id=await world.make_user(_name("gone"), target.project, "reader"))


async def _grant_role(world: World, target: Target) -> message.Message:
    return I.GrantRoleRequest(user_id=target.user, project_id=target.project, role="member")


async def _revoke_role(world: World, target: Target) -> message.Message:
    user_id = await world.make_user(_name("held"), target.project, "member")
    return I.RevokeRoleRequest(user_id=user_id, project_id=target.project, role="member")


async def _update_quota(world: World, target: Target) -> message.Message:
    return I.UpdateQuotaRequest(quota=I.Quota(project_id=target.project, limits={"routers": 7}),
                                update_mask=_mask("limits.routers"))


async def _update_default_quota(world: World, target: Target) -> message.Message:
    return I.UpdateDefaultQuotaRequest(quota=I.Quota(limits={"routers": 10}),
                                       update_mask=_mask("limits.routers"))


async def _update_node(world: World, target: Target) -> message.Message:
    return S.UpdateNodeRequest(name=NODES[0], settings=S.NodeSettings(disabled=False),
                               update_mask=_mask("disabled"))


async def _update_default_ratios(world: World, target: Target) -> message.Message:
    # 16.0 is what the arena's scheduler seeded (the built-in default).
    return S.UpdateDefaultAllocationRatiosRequest(
        default_allocation_ratios=S.DefaultAllocationRatios(ratios=S.AllocationRatios(cpu=16.0)),
        update_mask=_mask("ratios.cpu"))


async def _select(world: World, target: Target) -> message.Message:
    return S.SelectDestinationsRequest(spec=S.RequestSpec(
        resources=SMALL, consumer_ids=[str(uuid.uuid4())], project_id=target.project))


async def _release(world: World, target: Target) -> message.Message:
    return S.ReleaseAllocationsRequest(consumer_id=await placed(world, target.project))


async def _move(world: World, target: Target) -> message.Message:
    return S.MoveAllocationsRequest(consumer_id=await placed(world, target.project),
                                    target_node=NODES[1])


async def _create_group(world: World, target: Target) -> message.Message:
    return S.CreateServerGroupRequest(
        server_group=S.ServerGroup(meta=_meta(name=_name("g"), project_id=target.project),
                                   policy=S.ANTI_AFFINITY),
        request_id=_name("r"))


async def _delete_group(world: World, target: Target) -> message.Message:
    return S.DeleteServerGroupRequest(id=await group(world, target.project, "cloud_admin"))


def upload_messages(image_id: str, data: bytes = IMAGE_BYTES) -> list[G.UploadImageRequest]:
    """A whole upload of `data`: its header (size, sha256), then one chunk."""
    return [G.UploadImageRequest(header=G.ImageUploadHeader(
        image_id=image_id, size_bytes=len(data), checksum_sha256=hashlib.sha256(data).hexdigest())),
        G.UploadImageRequest(chunk=data)]


async def image(world: World, project_id: str, *, active: bool = False,
                visibility: int = G.Image.VISIBILITY_PRIVATE,
                disk_format: int = G.Image.DISK_FORMAT_RAW) -> str:
    """An image of `project_id`, made (and uploaded, if `active`) by the cloud-admin."""
    made = G.Image(meta=_meta(name=_name("i"), project_id=project_id))
    made.visibility = visibility  # type: ignore[assignment]
    made.disk_format = disk_format  # type: ignore[assignment]
    reply = await world.call(STORAGE, "CreateImage", G.CreateImageRequest(image=made),
                             "cloud_admin")
    assert isinstance(reply, G.Image)
    if active:
        await world.call(STORAGE, "UploadImage", upload_messages(reply.meta.id), "cloud_admin")
    return reply.meta.id


async def _get_image(world: World, target: Target) -> message.Message:
    return G.GetImageRequest(id=await image(world, target.project))


async def _create_image(world: World, target: Target) -> message.Message:
    return G.CreateImageRequest(image=G.Image(meta=_meta(name=_name("i")),
                                              disk_format=G.Image.DISK_FORMAT_QCOW2,
                                              properties={"os_distro": "debian"}),
                                request_id=_name("r"))


async def _update_image(world: World, target: Target) -> message.Message:
    sent = G.Image(meta=_meta(id=await image(world, target.project), description="fuzzed"),
                   min_ram_mb=128)
    return G.UpdateImageRequest(image=sent, update_mask=_mask("meta.description", "min_ram_mb"))


async def _delete_image(world: World, target: Target) -> message.Message:
    return G.DeleteImageRequest(id=await image(world, target.project, active=True))


async def _upload_image(world: World, target: Target) -> message.Message:
    # A stream of one message (the header): the sweep sends one payload per call.
    return upload_messages(await image(world, target.project))[0]


async def _download_image(world: World, target: Target) -> message.Message:
    return G.DownloadImageRequest(id=await image(world, target.project, active=True), offset=1)


async def _add_member(world: World, target: Target) -> message.Message:
    image_id = await image(world, target.project, visibility=G.Image.VISIBILITY_SHARED)
    return G.ImageMemberRequest(image_id=image_id, project_id=str(uuid.uuid4()))


async def _remove_member(world: World, target: Target) -> message.Message:
    image_id = await image(world, target.project, visibility=G.Image.VISIBILITY_SHARED)
    member = str(uuid.uuid4())
    await world.call(STORAGE, "AddImageMember", G.ImageMemberRequest(
        image_id=image_id, project_id=member), "cloud_admin")
    return G.ImageMemberRequest(image_id=image_id, project_id=member)


def _fixed(build: Callable[[Target], message.Message]) -> Seed:
    async def seed(world: World, target: Target) -> message.Message:
        return build(target)

    return seed


SEEDS: dict[str, Seed] = {
    f"{IDENTITY}/Authenticate": _authenticate,
    f"{IDENTITY}/RevokeToken": _revoke_token,
    f"{IDENTITY}/ListSigningKeys": _fixed(lambda t: I.ListSigningKeysRequest()),
    f"{IDENTITY}/CreateProject": _create_project,
    f"{IDENTITY}/GetProject": _fixed(lambda t: I.GetProjectRequest(id=t.project)),
    f"{IDENTITY}/ListProjects": _fixed(
        lambda t: I.ListProjectsRequest(page_size=2, filter="state=ENABLED")),
    f"{IDENTITY}/UpdateProject": _update_project,
    f"{IDENTITY}/DeleteProject": _delete_project,
    f"{IDENTITY}/CreateUser": _create_user,
    f"{IDENTITY}/GetUser": _fixed(lambda t: I.GetUserRequest(id=t.user)),
    f"{IDENTITY}/ListUsers": _fixed(
        lambda t: I.ListUsersRequest(page_size=2, filter="state=ENABLED")),
    f"{IDENTITY}/UpdateUser": _update_user,
    f"{IDENTITY}/DeleteUser": _delete_user,
    f"{IDENTITY}/GrantRole": _grant_role,
    f"{IDENTITY}/RevokeRole": _revoke_role,
    f"{IDENTITY}/ListRoleAssignments": _fixed(
        lambda t: I.ListRoleAssignmentsRequest(project_id=t.project, page_size=2)),
    f"{IDENTITY}/GetQuota": _fixed(lambda t: I.GetQuotaRequest(project_id=t.project)),
    f"{IDENTITY}/UpdateQuota": _update_quota,
    f"{IDENTITY}/GetUsage": _fixed(lambda t: I.GetUsageRequest(project_id=t.project)),
    f"{IDENTITY}/GetDefaultQuota": _fixed(lambda t: I.GetDefaultQuotaRequest()),
    f"{IDENTITY}/UpdateDefaultQuota": _update_default_quota,
    f"{IDENTITY}/ListEndpoints": _fixed(lambda t: I.ListEndpointsRequest()),
    f"{SCHEDULER}/ListNodes": _fixed(lambda t: S.ListNodesRequest(page_size=1)),
    f"{SCHEDULER}/GetNode": _fixed(lambda t: S.GetNodeRequest(name=NODES[0])),
    f"{SCHEDULER}/UpdateNode": _update_node,
    f"{SCHEDULER}/GetDefaultAllocationRatios": _fixed(
        lambda t: S.GetDefaultAllocationRatiosRequest()),
    f"{SCHEDULER}/UpdateDefaultAllocationRatios": _update_default_ratios,
    f"{SCHEDULER}/SelectDestinations": _select,
    f"{SCHEDULER}/GetAllocations": _fixed(lambda t: S.GetAllocationsRequest(
        consumer_id=t.consumer)),
    f"{SCHEDULER}/ReleaseAllocations": _release,
    f"{SCHEDULER}/MoveAllocations": _move,
    f"{SCHEDULER}/CreateServerGroup": _create_group,
    f"{SCHEDULER}/GetServerGroup": _fixed(lambda t: S.GetServerGroupRequest(id=t.group)),
    f"{SCHEDULER}/ListServerGroups": _fixed(lambda t: S.ListServerGroupsRequest(page_size=1)),
    f"{SCHEDULER}/DeleteServerGroup": _delete_group,
    f"{STORAGE}/GetImage": _get_image,
    f"{STORAGE}/ListImages": _fixed(lambda t: G.ListImagesRequest(
        page_size=2, filter="state=QUEUED property.os_distro=debian")),
    f"{STORAGE}/CreateImage": _create_image,
    f"{STORAGE}/UpdateImage": _update_image,
    f"{STORAGE}/DeleteImage": _delete_image,
    f"{STORAGE}/UploadImage": _upload_image,
    f"{STORAGE}/DownloadImage": _download_image,
    f"{STORAGE}/AddImageMember": _add_member,
    f"{STORAGE}/RemoveImageMember": _remove_member,
}



# --- network: security groups, routers, floating IPs ----------------------------------

NETWORK = "nubis.network.v1.NetworkService"
SG = security_group_pb2
RT = router_pb2
FIP = floating_ip_pb2
# One external and one private network (each with a subnet) per target project, made once.
_NETWORKS: dict[tuple[str, str, bool], tuple[str, str]] = {}


async def _network(world: World, target: Target, *, external: bool) -> tuple[str, str]:
    """(network id, subnet id) of the target's external or private seed network."""
    key = (world.store.root, target.project, external)
    if key not in _NETWORKS:
        await _unlimited(world, target.project)  # other seeds may have filled its quota
        made = await world.call(NETWORK, "CreateNetwork", network_pb2.CreateNetworkRequest(
            network=network_pb2.Network(meta=_meta(name=_name("n"), project_id=target.project),
                                        external=external)), "cloud_admin")
        assert isinstance(made, network_pb2.Network)
        cidr = "198.18.0.0/24" if external else "10.250.0.0/24"
        sub = await world.call(NETWORK, "CreateSubnet", subnet_pb2.CreateSubnetRequest(
            subnet=subnet_pb2.Subnet(meta=_meta(name=_name("s"), project_id=target.project),
                                     network_id=made.meta.id, cidr=cidr)), "cloud_admin")
        assert isinstance(sub, subnet_pb2.Subnet)
        _NETWORKS[key] = (made.meta.id, sub.meta.id)
    return _NETWORKS[key]


async def security_group(world: World, target: Target) -> str:
    """A security group of the target project (made by the cloud-admin)."""
    made = await world.call(NETWORK, "CreateSecurityGroup", SG.CreateSecurityGroupRequest(
        security_group=SG.SecurityGroup(meta=_meta(name=_name("sg"), project_id=target.project))),
        "cloud_admin")
    assert isinstance(made, SG.SecurityGroup)
    return made.meta.id


def _tcp_rule(group_id: str) -> SG.SecurityGroupRule:
    return SG.SecurityGroupRule(security_group_id=group_id, protocol="tcp",
                                direction=SG.SecurityGroupRule.DIRECTION_INGRESS,
                                port_range_min=22, port_range_max=22,
                                remote_ip_prefix="10.0.0.0/8")


async def security_group_rule(world: World, target: Target) -> str:
    made = await world.call(NETWORK, "CreateSecurityGroupRule", SG.CreateSecurityGroupRuleRequest(
        security_group_rule=_tcp_rule(await security_group(world, target))), "cloud_admin")
    assert isinstance(made, SG.SecurityGroupRule)
    return made.meta.id


async def router(world: World, target: Target) -> str:
    """A router of the target project, as stored: no network node runs in the sweep to host one."""
    made = RT.Router(meta=resources.fresh_meta(_meta(name=_name("r")), target.project),
                     state=RT.Router.ERROR, admin_state_up=True)
    await world.store.create(f"network/routers/{made.meta.id}", made)
    return made.meta.id


async def floating_ip(world: World, target: Target) -> str:
    network_id, _ = await _network(world, target, external=True)
    made = await world.call(NETWORK, "CreateFloatingIp", FIP.CreateFloatingIpRequest(
        floating_ip=FIP.FloatingIp(meta=_meta(project_id=target.project),
                                   floating_network_id=network_id)), "cloud_admin")
    assert isinstance(made, FIP.FloatingIp)
    return made.meta.id


async def _port(world: World, target: Target) -> str:
    network_id, _ = await _network(world, target, external=False)
    made = await world.call(NETWORK, "CreatePort", port_pb2.CreatePortRequest(
        port=port_pb2.Port(meta=_meta(name=_name("p"), project_id=target.project),
                           network_id=network_id)), "cloud_admin")
    assert isinstance(made, port_pb2.Port)
    return made.meta.id


async def _create_security_group(world: World, t: Target) -> message.Message:
    return SG.CreateSecurityGroupRequest(security_group=SG.SecurityGroup(
        meta=_meta(name=_name("sg"), project_id=t.project)), request_id=_name("r"))


async def _update_security_group(world: World, t: Target) -> message.Message:
    return SG.UpdateSecurityGroupRequest(
        security_group=SG.SecurityGroup(meta=_meta(id=await security_group(world, t),
                                                   description="fuzzed")),
        update_mask=_mask("meta.description"))


async def _create_rule(world: World, t: Target) -> message.Message:
    return SG.CreateSecurityGroupRuleRequest(
        security_group_rule=_tcp_rule(await security_group(world, t)), request_id=_name("r"))


async def _create_router(world: World, t: Target) -> message.Message:
    return RT.CreateRouterRequest(router=RT.Router(
        meta=_meta(name=_name("r"), project_id=t.project)), request_id=_name("r"))


async def _update_router(world: World, t: Target) -> message.Message:
    return RT.UpdateRouterRequest(
        router=RT.Router(meta=_meta(id=await router(world, t), description="fuzzed"),
                         admin_state_up=True),
        update_mask=_mask("meta.description", "routes", "admin_state_up"))


async def _add_interface(world: World, t: Target) -> message.Message:
    _, subnet_id = await _network(world, t, external=False)
    return RT.AddRouterInterfaceRequest(router_id=await router(world, t), subnet_id=subnet_id)


async def _remove_interface(world: World, t: Target) -> message.Message:
    _, subnet_id = await _network(world, t, external=False)
    return RT.RemoveRouterInterfaceRequest(router_id=await router(world, t), subnet_id=subnet_id)


async def _create_floating_ip(world: World, t: Target) -> message.Message:
    network_id, _ = await _network(world, t, external=True)
    return FIP.CreateFloatingIpRequest(floating_ip=FIP.FloatingIp(
        meta=_meta(project_id=t.project), floating_network_id=network_id), request_id=_name("r"))


async def _update_floating_ip(world: World, t: Target) -> message.Message:
    return FIP.UpdateFloatingIpRequest(
        floating_ip=FIP.FloatingIp(meta=_meta(id=await floating_ip(world, t),
                                              description="fuzzed")),
        update_mask=_mask("meta.description"))


async def _associate(world: World, t: Target) -> message.Message:
    return FIP.AssociateFloatingIpRequest(id=await floating_ip(world, t),
                                          port_id=await _port(world, t))


def _with_id(build: Callable[[str], message.Message],
             make: Callable[[World, Target], Awaitable[str]]) -> Seed:
    """A seed naming a resource made for it by `make`."""
    async def seed(world: World, target: Target) -> message.Message:
        return build(await make(world, target))

    return seed


SEEDS.update({
    f"{NETWORK}/CreateSecurityGroup": _create_security_group,
    f"{NETWORK}/GetSecurityGroup": _with_id(lambda i: SG.GetSecurityGroupRequest(id=i),
                                            security_group),
    f"{NETWORK}/ListSecurityGroups": _fixed(lambda t: SG.ListSecurityGroupsRequest(
        page_size=2, filter="name=default")),
    f"{NETWORK}/UpdateSecurityGroup": _update_security_group,
    f"{NETWORK}/DeleteSecurityGroup": _with_id(lambda i: SG.DeleteSecurityGroupRequest(id=i),
                                               security_group),
    f"{NETWORK}/CreateSecurityGroupRule": _create_rule,
    f"{NETWORK}/GetSecurityGroupRule": _with_id(
        lambda i: SG.GetSecurityGroupRuleRequest(id=i), security_group_rule),
    f"{NETWORK}/ListSecurityGroupRules": _fixed(lambda t: SG.ListSecurityGroupRulesRequest(
        page_size=2, filter="direction=EGRESS protocol=any")),
    f"{NETWORK}/DeleteSecurityGroupRule": _with_id(
        lambda i: SG.DeleteSecurityGroupRuleRequest(id=i), security_group_rule),
    f"{NETWORK}/CreateRouter": _create_router,
    f"{NETWORK}/GetRouter": _with_id(lambda i: RT.GetRouterRequest(id=i), router),
    f"{NETWORK}/ListRouters": _fixed(lambda t: RT.ListRoutersRequest(
        page_size=2, filter="state=ACTIVE,ERROR")),
    f"{NETWORK}/UpdateRouter": _update_router,
    f"{NETWORK}/DeleteRouter": _with_id(lambda i: RT.DeleteRouterRequest(id=i), router),
    f"{NETWORK}/AddRouterInterface": _add_interface,
    f"{NETWORK}/RemoveRouterInterface": _remove_interface,
    f"{NETWORK}/CreateFloatingIp": _create_floating_ip,
    f"{NETWORK}/GetFloatingIp": _with_id(lambda i: FIP.GetFloatingIpRequest(id=i), floating_ip),
    f"{NETWORK}/ListFloatingIps": _fixed(lambda t: FIP.ListFloatingIpsRequest(
        page_size=2, filter="state=DOWN")),
    f"{NETWORK}/UpdateFloatingIp": _update_floating_ip,
    f"{NETWORK}/DeleteFloatingIp": _with_id(lambda i: FIP.DeleteFloatingIpRequest(id=i),
                                            floating_ip),
    f"{NETWORK}/AssociateFloatingIp": _associate,
    f"{NETWORK}/DisassociateFloatingIp": _with_id(
        lambda i: FIP.DisassociateFloatingIpRequest(id=i), floating_ip),
})


# --- storage: volumes, snapshots, attachments, pools ---------------------------
# Records are written straight into the store (the arena runs no agents); a
# request that would need a node finds none with a pool and is refused.
V = volume_pb2
SN = snapshot_pb2
AT = attachment_pb2
PL = pool_pb2


async def volume(world: World, project_id: str, state: int = V.Volume.AVAILABLE) -> str:
    """A volume record of `project_id` on the first fuzz node."""
    meta = resources.fresh_meta(_meta(name=_name("v")), project_id)
    made = V.Volume(meta=meta, size_gb=1, node=NODES[0], pool_id=str(uuid.uuid4()),
                    pool_name="fuzz-pool", libvirt_name=f"volume-{meta.id}", format="qcow2")
    made.state = state  # type: ignore[assignment]
    await world.store.create(storage_keys.volume(meta.id), made)
    return meta.id


async def snapshot(world: World, project_id: str) -> str:
    source = await volume(world, project_id)
    meta = resources.fresh_meta(_meta(name=_name("s")), project_id)
    await world.store.create(storage_keys.snapshot(meta.id), SN.Snapshot(
        meta=meta, state=SN.Snapshot.AVAILABLE, volume_id=source, size_gb=1, node=NODES[0]))
    return meta.id


async def attachment(world: World, project_id: str, state: int) -> str:
    """An attachment in `state` of a fresh volume whose state goes with it."""
    states: dict[int, int] = {AT.VolumeAttachment.RESERVED: V.Volume.RESERVED,
                              AT.VolumeAttachment.ATTACHING: V.Volume.ATTACHING,
                              AT.VolumeAttachment.ATTACHED: V.Volume.IN_USE}
    volume_state = states[state]
    volume_id = await volume(world, project_id, volume_state)
    meta = resources.fresh_meta(_meta(name=_name("a")), project_id)
    made = AT.VolumeAttachment(meta=meta, volume_id=volume_id, instance_id=str(uuid.uuid4()),
                               node=NODES[0])
    made.state = state  # type: ignore[assignment]
    await world.store.create(storage_keys.attachment(meta.id), made)
    found = await world.store.get(storage_keys.volume(volume_id), V.Volume)
    found.value.attachments.add(attachment_id=meta.id, instance_id=made.instance_id)
    await world.store.replace(storage_keys.volume(volume_id), found.value,
                              expect_revision=found.mod_revision)
    return meta.id


def _volume_seed(build: Callable[[str], message.Message]) -> Seed:
    async def seed(world: World, target: Target) -> message.Message:
        return build(await volume(world, target.project))

    return seed


def _attachment_seed(state: int, build: Callable[[str], message.Message]) -> Seed:
    async def seed(world: World, target: Target) -> message.Message:
        return build(await attachment(world, target.project, state))

    return seed


async def _update_volume(world: World, target: Target) -> message.Message:
    return V.UpdateVolumeRequest(
        volume=V.Volume(meta=_meta(id=await volume(world, target.project), name=_name("r"))),
        update_mask=_mask("meta.name", "bootable"))


async def _snapshot_of(world: World, target: Target) -> message.Message:
    return SN.CreateSnapshotRequest(snapshot=SN.Snapshot(
        meta=_meta(name=_name("s")), volume_id=await volume(world, target.project)),
        request_id=_name("r"))


async def _update_snapshot(world: World, target: Target) -> message.Message:
    return SN.UpdateSnapshotRequest(
        snapshot=SN.Snapshot(meta=_meta(id=await snapshot(world, target.project),
                                        description="fuzzed")),
        update_mask=_mask("meta.description"))


async def _snapshot_seed_delete(world: World, target: Target) -> message.Message:
    return SN.DeleteSnapshotRequest(id=await snapshot(world, target.project))


async def _get_snapshot(world: World, target: Target) -> message.Message:
    return SN.GetSnapshotRequest(id=await snapshot(world, target.project))


SEEDS.update({
    f"{STORAGE}/GetVolume": _volume_seed(lambda i: V.GetVolumeRequest(id=i)),
    f"{STORAGE}/ListVolumes": _fixed(lambda t: V.ListVolumesRequest(
        page_size=2, filter="state=AVAILABLE bootable=false")),
    f"{STORAGE}/CreateVolume": _fixed(lambda t: V.CreateVolumeRequest(volume=V.Volume(
        meta=_meta(name=_name("v")), size_gb=1), request_id=_name("r"))),
    f"{STORAGE}/UpdateVolume": _update_volume,
    f"{STORAGE}/DeleteVolume": _volume_seed(lambda i: V.DeleteVolumeRequest(id=i)),
    f"{STORAGE}/ExtendVolume": _volume_seed(lambda i: V.ExtendVolumeRequest(id=i,
                                                                            new_size_gb=2)),
    f"{STORAGE}/ResetVolumeState": _volume_seed(lambda i: V.ResetVolumeStateRequest(
        id=i, state=V.Volume.ERROR)),
    f"{STORAGE}/WatchVolumes": _fixed(lambda t: V.WatchVolumesRequest(filter="state=AVAILABLE")),
    f"{STORAGE}/CreateRootDisk": _fixed(lambda t: V.CreateRootDiskRequest(
        instance_id=str(uuid.uuid4()), project_id=t.project, image_id=str(uuid.uuid4()),
        node=NODES[0], size_gb=1)),
    f"{STORAGE}/GetSnapshot": _get_snapshot,
    f"{STORAGE}/ListSnapshots": _fixed(lambda t: SN.ListSnapshotsRequest(
        page_size=2, filter="state=AVAILABLE")),
    f"{STORAGE}/CreateSnapshot": _snapshot_of,
    f"{STORAGE}/UpdateSnapshot": _update_snapshot,
    f"{STORAGE}/DeleteSnapshot": _snapshot_seed_delete,
    f"{STORAGE}/GetVolumeAttachment": _attachment_seed(
        AT.VolumeAttachment.ATTACHED, lambda i: AT.GetVolumeAttachmentRequest(id=i)),
    f"{STORAGE}/ListVolumeAttachments": _fixed(lambda t: AT.ListVolumeAttachmentsRequest(
        page_size=2, filter="state=ATTACHED")),
    f"{STORAGE}/ReserveVolume": _volume_seed(lambda i: AT.ReserveVolumeRequest(
        volume_id=i, instance_id=str(uuid.uuid4()), node=NODES[0])),
    f"{STORAGE}/BeginAttach": _attachment_seed(
        AT.VolumeAttachment.RESERVED,
        lambda i: AT.BeginAttachRequest(attachment_id=i, device_name="vdb")),
    f"{STORAGE}/CompleteAttach": _attachment_seed(
        AT.VolumeAttachment.ATTACHING, lambda i: AT.CompleteAttachRequest(attachment_id=i)),
    f"{STORAGE}/BeginDetach": _attachment_seed(
        AT.VolumeAttachment.ATTACHED, lambda i: AT.BeginDetachRequest(attachment_id=i)),
    f"{STORAGE}/CompleteDetach": _attachment_seed(
        AT.VolumeAttachment.ATTACHED, lambda i: AT.CompleteDetachRequest(attachment_id=i)),
    f"{STORAGE}/GetStoragePool": _fixed(lambda t: PL.GetStoragePoolRequest(
        id=str(uuid.uuid4()))),
    f"{STORAGE}/ListStoragePools": _fixed(lambda t: PL.ListStoragePoolsRequest(
        page_size=2, filter="state=ACTIVE")),
    f"{STORAGE}/CreateStoragePool": _fixed(lambda t: PL.CreateStoragePoolRequest(
        storage_pool=PL.StoragePool(meta=_meta(name=_name("p")), node=NODES[0],
                                    path="/var/lib/nubis/pools/extra"), validate_only=True)),
    f"{STORAGE}/UpdateStoragePool": _fixed(lambda t: PL.UpdateStoragePoolRequest(
        storage_pool=PL.StoragePool(meta=_meta(id=str(uuid.uuid4())),
                                    state=PL.StoragePool.DISABLED),
        update_mask=_mask("state"))),
    f"{STORAGE}/DeleteStoragePool": _fixed(lambda t: PL.DeleteStoragePoolRequest(
        id=str(uuid.uuid4()))),
})


# --- network: networks, subnets, ports, binding ---------------------------------------

NET = network_pb2
SUB = subnet_pb2
PRT = port_pb2
# Realized nowhere: no agent runs in the sweep (a bind leaves the port BUILD).
BIND_NODE = "fuzz-net-node"


async def _unlimited(world: World, project_id: str) -> None:
    """Seeds make a network per request: no network, subnet or port quota for the project.

    Set before each (an UpdateQuota seed may have replaced the project's limits).
    """

    async def body(txn: Txn) -> None:
        found = await txn.get(quota.quota_key(project_id), identity_pb2.Quota)
        record = found.value if found else identity_pb2.Quota(project_id=project_id)
        for name in ("networks", "subnets", "ports"):
            record.limits[name] = quota.UNLIMITED
        txn.put(quota.quota_key(project_id), record)

    await world.store.atomic(body)


async def _fresh_network(world: World, target: Target) -> str:
    """A network of the target project with a /24 (each seed may delete what it names)."""
    await _unlimited(world, target.project)
    made = await world.call(NETWORK, "CreateNetwork", NET.CreateNetworkRequest(
        network=NET.Network(meta=_meta(name=_name("n"), project_id=target.project))),
        "cloud_admin")
    assert isinstance(made, NET.Network)
    await world.call(NETWORK, "CreateSubnet", SUB.CreateSubnetRequest(subnet=SUB.Subnet(
        network_id=made.meta.id, cidr="10.251.0.0/24", dhcp_enabled=True)), "cloud_admin")
    return made.meta.id


async def _fresh_subnet(world: World, target: Target) -> str:
    await _unlimited(world, target.project)
    made = await world.call(NETWORK, "CreateNetwork", NET.CreateNetworkRequest(
        network=NET.Network(meta=_meta(name=_name("n"), project_id=target.project))),
        "cloud_admin")
    assert isinstance(made, NET.Network)
    sub = await world.call(NETWORK, "CreateSubnet", SUB.CreateSubnetRequest(subnet=SUB.Subnet(
        network_id=made.meta.id, cidr="10.252.0.0/24")), "cloud_admin")
    assert isinstance(sub, SUB.Subnet)
    return sub.meta.id


async def _create_network(world: World, t: Target) -> message.Message:
    await _unlimited(world, t.project)
    return NET.CreateNetworkRequest(network=NET.Network(
        meta=_meta(name=_name("n"), project_id=t.project), mtu=1400), request_id=_name("r"))


async def _update_network(world: World, t: Target) -> message.Message:
    return NET.UpdateNetworkRequest(
        network=NET.Network(meta=_meta(id=await _fresh_network(world, t), description="fuzzed"),
                            mtu=1400),
        update_mask=_mask("meta.description", "mtu"))


async def _roomy_port(world: World, target: Target) -> str:
    """`_port`, with room in the target's quota (a fuzzed UpdateQuota may have shrunk it)."""
    await _unlimited(world, target.project)
    return await _port(world, target)


async def _create_subnet(world: World, t: Target) -> message.Message:
    await _unlimited(world, t.project)
    network_id, _ = await _network(world, t, external=False)
    return SUB.CreateSubnetRequest(subnet=SUB.Subnet(
        network_id=network_id, cidr="10.253.0.0/24", gateway_ip="10.253.0.1",
        allocation_pools=[SUB.AllocationPool(start="10.253.0.10", end="10.253.0.99")],
        dns_nameservers=["10.253.0.53"], dhcp_enabled=True,
        host_routes=[SUB.HostRoute(destination="10.9.0.0/16", nexthop="10.253.0.5")]),
        validate_only=True)


async def _update_subnet(world: World, t: Target) -> message.Message:
    return SUB.UpdateSubnetRequest(
        subnet=SUB.Subnet(meta=_meta(id=await _fresh_subnet(world, t)),
                          dns_nameservers=["10.252.0.53"]),
        update_mask=_mask("dns_nameservers"))


async def _create_port(world: World, t: Target) -> message.Message:
    await _unlimited(world, t.project)
    network_id, subnet_id = await _network(world, t, external=False)
    return PRT.CreatePortRequest(port=PRT.Port(
        meta=_meta(name=_name("p"), project_id=t.project), network_id=network_id,
        fixed_ips=[PRT.FixedIp(subnet_id=subnet_id)],
        allowed_address_pairs=[PRT.AllowedAddressPair(ip_address="10.250.0.0/28")]),
        request_id=_name("r"))


async def _update_port(world: World, t: Target) -> message.Message:
    return PRT.UpdatePortRequest(
        port=PRT.Port(meta=_meta(id=await _roomy_port(world, t), description="fuzzed"),
                      device_id="fuzz-device"),
        update_mask=_mask("meta.description", "device_id"))


async def _bind(world: World, t: Target) -> message.Message:
    return PRT.BindPortRequest(id=await _roomy_port(world, t), node=BIND_NODE,
                               device_id="fuzz-server", device_owner="compute:nova")


SEEDS.update({
    f"{NETWORK}/CreateNetwork": _create_network,
    f"{NETWORK}/GetNetwork": _with_id(lambda i: NET.GetNetworkRequest(id=i), _fresh_network),
    f"{NETWORK}/ListNetworks": _fixed(lambda t: NET.ListNetworksRequest(
        page_size=2, filter="state=ACTIVE shared=false")),
    f"{NETWORK}/UpdateNetwork": _update_network,
    f"{NETWORK}/DeleteNetwork": _with_id(lambda i: NET.DeleteNetworkRequest(id=i),
                                         _fresh_network),
    f"{NETWORK}/GetNetworkIpAvailability": _with_id(
        lambda i: NET.GetNetworkIpAvailabilityRequest(network_id=i), _fresh_network),
    f"{NETWORK}/CreateSubnet": _create_subnet,
    f"{NETWORK}/GetSubnet": _with_id(lambda i: SUB.GetSubnetRequest(id=i), _fresh_subnet),
    f"{NETWORK}/ListSubnets": _fixed(lambda t: SUB.ListSubnetsRequest(
        page_size=2, filter="ip_version=4")),
    f"{NETWORK}/UpdateSubnet": _update_subnet,
    f"{NETWORK}/DeleteSubnet": _with_id(lambda i: SUB.DeleteSubnetRequest(id=i),
                                        _fresh_subnet),
    f"{NETWORK}/CreatePort": _create_port,
    f"{NETWORK}/GetPort": _with_id(lambda i: PRT.GetPortRequest(id=i), _roomy_port),
    f"{NETWORK}/ListPorts": _fixed(lambda t: PRT.ListPortsRequest(
        page_size=2, filter="state=DOWN device_owner=compute:nova")),
    f"{NETWORK}/UpdatePort": _update_port,
    f"{NETWORK}/DeletePort": _with_id(lambda i: PRT.DeletePortRequest(id=i), _roomy_port),
    f"{NETWORK}/WatchPorts": _fixed(lambda t: PRT.WatchPortsRequest(
        options=resource_pb2.WatchOptions(initial_state=True), filter="state=DOWN")),
    f"{NETWORK}/BindPort": _bind,
    f"{NETWORK}/UnbindPort": _with_id(lambda i: PRT.UnbindPortRequest(id=i, keep_device=True),
                                      _roomy_port),
})


# --- compute: power verbs, reset-state, console log, watch ----------------------
# Instance records are written straight into the store on the first fuzz node
# (no agent runs there: a power operation waits on it in the background until
# the arena stops); the console log's seed has no node, so it answers at once.
COMPUTE = "nubis.compute.v1.ComputeService"
CI = instance_pb2
CV = instance_verbs_pb2
CR = instance_requests_pb2


async def instance(world: World, project_id: str, state: int = CI.Instance.ACTIVE,
                   node: str = NODES[0]) -> str:
    """An idle instance record of `project_id` in `state` on `node`."""
    meta = resources.fresh_meta(_meta(name=_name("i")), project_id)
    made = CI.Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                       node=node)
    made.state = state  # type: ignore[assignment]
    await world.store.create(compute_keys.instance(meta.id), made)
    return meta.id


def _instance_seed(build: Callable[[str], message.Message], state: int = CI.Instance.ACTIVE,
                   node: str = NODES[0]) -> Seed:
    async def seed(world: World, target: Target) -> message.Message:
        return build(await instance(world, target.project, state, node))

    return seed


SEEDS.update({
    f"{COMPUTE}/StartInstance": _instance_seed(lambda i: CV.StartInstanceRequest(id=i),
                                               CI.Instance.STOPPED),
    f"{COMPUTE}/StopInstance": _instance_seed(lambda i: CV.StopInstanceRequest(
        id=i, timeout_seconds=30)),
    f"{COMPUTE}/RebootInstance": _instance_seed(lambda i: CV.RebootInstanceRequest(
        id=i, type=CV.RebootInstanceRequest.REBOOT_TYPE_HARD)),
    f"{COMPUTE}/ResetInstanceState": _instance_seed(lambda i: CV.ResetInstanceStateRequest(
        id=i, state=CI.Instance.ERROR), CI.Instance.ERROR),
    f"{COMPUTE}/GetConsoleLog": _instance_seed(lambda i: CV.GetConsoleLogRequest(
        id=i, tail_lines=10), CI.Instance.BUILDING, node=""),
    f"{COMPUTE}/WatchInstances": _fixed(lambda t: CR.WatchInstancesRequest(
        options=resource_pb2.WatchOptions(initial_state=True), filter="state=ACTIVE")),
})


# --- compute: flavors and key pairs -------------------------------------------------
# Flavors are the cloud-admin's (made by it for each seed); a key pair is its
# user's, so each caller's seeds name key pairs that caller made.
FL = flavor_pb2
KP = keypair_pb2
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl fuzz"


async def flavor(world: World, target: Target, *, public: bool = True,
                 access: bool = False) -> str:
    """A flavor made by the cloud-admin (a private one shared with the target's project)."""
    made = await world.call(COMPUTE, "CreateFlavor", FL.CreateFlavorRequest(flavor=FL.Flavor(
        meta=_meta(name=_name("fl")), vcpus=1, ram_mb=128, is_public=public)), "cloud_admin")
    assert isinstance(made, FL.Flavor)
    if access:
        await world.call(COMPUTE, "AddFlavorAccess", FL.FlavorAccessRequest(
            flavor_id=made.meta.id, project_id=target.project), "cloud_admin")
    return made.meta.id


async def _private_flavor(world: World, target: Target) -> str:
    return await flavor(world, target, public=False)


async def _shared_flavor(world: World, target: Target) -> str:
    return await flavor(world, target, public=False, access=True)


async def key_pair(world: World, target: Target) -> str:
    """A key pair of the caller whose target this is (project A's is the member's)."""
    caller = "a_member" if target.project == world.project_a else "cloud_admin"
    made = await world.call(COMPUTE, "CreateKeyPair", KP.CreateKeyPairRequest(
        key_pair=KP.KeyPair(meta=_meta(name=_name("kp")))), caller)
    assert isinstance(made, KP.CreateKeyPairResponse)
    return made.key_pair.meta.id


def _create_flavor(t: Target) -> message.Message:
    return FL.CreateFlavorRequest(flavor=FL.Flavor(
        meta=_meta(name=_name("fl"), description="fuzz"), vcpus=2, ram_mb=256, disk_gb=1,
        ephemeral_gb=1, swap_mb=64, is_public=True,
        extra_specs={"trait:HW_CPU_X86_AVX2": "required", "hw:cpu_policy": "shared"}),
        request_id=_name("r"))


def _update_flavor(flavor_id: str) -> message.Message:
    return FL.UpdateFlavorRequest(
        flavor=FL.Flavor(meta=_meta(id=flavor_id, description="fuzzed"), state=FL.Flavor.ACTIVE,
                         extra_specs={"trait:CUSTOM_FUZZ": "forbidden"}),
        update_mask=_mask("meta.description", "state", "extra_specs"))


async def _shared_flavor_access(world: World, target: Target) -> message.Message:
    return FL.FlavorAccessRequest(flavor_id=await _shared_flavor(world, target),
                                  project_id=target.project)


def _create_key_pair(t: Target) -> message.Message:
    return KP.CreateKeyPairRequest(key_pair=KP.KeyPair(
        meta=_meta(name=_name("kp"), description="fuzz"), public_key=PUBLIC_KEY),
        request_id=_name("r"))


SEEDS.update({
    f"{COMPUTE}/GetFlavor": _with_id(lambda i: FL.GetFlavorRequest(id=i), flavor),
    f"{COMPUTE}/ListFlavors": _fixed(lambda t: FL.ListFlavorsRequest(
        page_size=2, filter="state=ACTIVE is_public=true")),
    f"{COMPUTE}/CreateFlavor": _fixed(_create_flavor),
    f"{COMPUTE}/UpdateFlavor": _with_id(_update_flavor, flavor),
    f"{COMPUTE}/DeleteFlavor": _with_id(lambda i: FL.DeleteFlavorRequest(id=i), flavor),
    f"{COMPUTE}/AddFlavorAccess": _with_id(lambda i: FL.FlavorAccessRequest(
        flavor_id=i, project_id=str(uuid.uuid4())), _private_flavor),
    f"{COMPUTE}/RemoveFlavorAccess": _shared_flavor_access,
    f"{COMPUTE}/GetKeyPair": _with_id(lambda i: KP.GetKeyPairRequest(id=i), key_pair),
    f"{COMPUTE}/ListKeyPairs": _fixed(lambda t: KP.ListKeyPairsRequest(
        page_size=2, filter="key_type=SSH")),
    f"{COMPUTE}/CreateKeyPair": _fixed(_create_key_pair),
    f"{COMPUTE}/UpdateKeyPair": _with_id(lambda i: KP.UpdateKeyPairRequest(
        key_pair=KP.KeyPair(meta=_meta(id=i, description="fuzzed")),
        update_mask=_mask("meta.description", "meta.labels")), key_pair),
    f"{COMPUTE}/DeleteKeyPair": _with_id(lambda i: KP.DeleteKeyPairRequest(id=i), key_pair),
})


# --- compute: instances and their actions -----------------------------------------
# A create names a flavor, an active image and a network of the target's project
# (validate_only: the quota is checked, nothing is written; a fuzzed request that
# clears it boots in the background, waiting on a node no agent serves). The
# other seeds name idle instance records in ERROR on no node, written straight
# into the store, so a delete tears down nothing on an agent.
CA = instance_action_pb2


async def _create_instance(world: World, target: Target) -> message.Message:
    network_id, _ = await _network(world, target, external=False)
    shape = CI.Instance(meta=resource_pb2.ResourceMeta(name=_name("vm"), labels={"fuzz": "1"}),
                        flavor_id=await flavor(world, target),
                        image_id=await image(world, target.project, active=True),
                        hostname="fuzz-vm")
    shape.networks.add(network_id=network_id)
    return CR.CreateInstanceRequest(instance=shape, request_id=_name("r"), validate_only=True)


async def _idle_instance(world: World, target: Target) -> str:
    return await instance(world, target.project, CI.Instance.ERROR, node="")


async def _instance_action(world: World, target: Target) -> tuple[str, str]:
    instance_id = await _idle_instance(world, target)
    found = await world.store.get(compute_keys.instance(instance_id), CI.Instance)
    record = CA.InstanceAction(meta=resources.fresh_meta(_meta(name="create"), target.project),
                               state=CA.InstanceAction.SUCCEEDED, instance_id=instance_id,
                               action="create", user_id=found.value.user_id)
    await world.store.create(compute_keys.action(instance_id, record.meta.id), record)
    return instance_id, record.meta.id


async def _get_instance_action(world: World, target: Target) -> message.Message:
    instance_id, action_id = await _instance_action(world, target)
    return CA.GetInstanceActionRequest(instance_id=instance_id, id=action_id)


async def _list_instance_actions(world: World, target: Target) -> message.Message:
    instance_id, _ = await _instance_action(world, target)
    return CA.ListInstanceActionsRequest(instance_id=instance_id, page_size=2,
                                         filter="action=create state=SUCCEEDED")


SEEDS.update({
    f"{COMPUTE}/GetInstance": _with_id(lambda i: CR.GetInstanceRequest(id=i), _idle_instance),
    f"{COMPUTE}/ListInstances": _fixed(lambda t: CR.ListInstancesRequest(
        page_size=2, filter="state=ERROR,ACTIVE label.fuzz=1")),
    f"{COMPUTE}/CreateInstance": _create_instance,
    f"{COMPUTE}/UpdateInstance": _with_id(lambda i: CR.UpdateInstanceRequest(
        instance=CI.Instance(meta=resource_pb2.ResourceMeta(id=i, name=_name("vm"),
                                                            labels={"fuzz": "2"}),
                             hostname="fuzzed"),
        update_mask=_mask("meta.name", "meta.labels", "hostname")), _idle_instance),
    f"{COMPUTE}/DeleteInstance": _with_id(lambda i: CR.DeleteInstanceRequest(id=i),
                                          _idle_instance),
    f"{COMPUTE}/ListInstanceActions": _list_instance_actions,
    f"{COMPUTE}/GetInstanceAction": _get_instance_action,
})


# --- compute: resize, migration, evacuation, hot-plug -------------------------------
# Instance records as above (on the first fuzz node, where no agent runs): a started
# move or plug waits on that node in the background until the arena stops.

async def _moving_instance(world: World, project_id: str) -> str:
    """An instance awaiting ConfirmResize / RevertResize, moved from the second node."""
    meta = resources.fresh_meta(_meta(name=_name("i")), project_id)
    made = CI.Instance(meta=meta, flavor_id=str(uuid.uuid4()), image_id=str(uuid.uuid4()),
                       node=NODES[0], state=CI.Instance.VERIFY_RESIZE)
    made.migration.CopyFrom(CI.MigrationInfo(
        kind=CI.MigrationInfo.KIND_RESIZE, source_node=NODES[1], destination_node=NODES[0],
        old_flavor_id=str(uuid.uuid4()), new_flavor_id=made.flavor_id))
    await world.store.create(compute_keys.instance(meta.id), made)
    return meta.id


def _verify_seed(build: Callable[[str], message.Message]) -> Seed:
    async def seed(world: World, target: Target) -> message.Message:
        return build(await _moving_instance(world, target.project))

    return seed


async def _resize(world: World, target: Target) -> message.Message:
    return CV.ResizeInstanceRequest(id=await instance(world, target.project),
                                    flavor_id=await flavor(world, target))


async def _attach_volume(world: World, target: Target) -> message.Message:
    return CV.AttachVolumeRequest(instance_id=await instance(world, target.project),
                                  volume_id=await volume(world, target.project),
                                  device_name="vdb")


async def _detach_volume(world: World, target: Target) -> message.Message:
    instance_id = await instance(world, target.project)
    volume_id = await volume(world, target.project, V.Volume.IN_USE)
    found = await world.store.get(compute_keys.instance(instance_id), CI.Instance)
    record = found.value
    record.volumes.add(volume_id=volume_id, attachment_id=str(uuid.uuid4()), device_name="vdb")
    await world.store.replace(compute_keys.instance(instance_id), record,
                              expect_revision=found.mod_revision)
    return CV.DetachVolumeRequest(instance_id=instance_id, volume_id=volume_id)


async def _attach_port(world: World, target: Target) -> message.Message:
    network_id, _ = await _network(world, target, external=False)
    return CV.AttachPortRequest(instance_id=await instance(world, target.project),
                                network=CI.NetworkRequest(network_id=network_id))


async def _detach_port(world: World, target: Target) -> message.Message:
    instance_id = await instance(world, target.project)
    port_id = str(uuid.uuid4())
    found = await world.store.get(compute_keys.instance(instance_id), CI.Instance)
    record = found.value
    record.networks.add(network_id=str(uuid.uuid4()))
    record.port_ids.append(port_id)
    await world.store.replace(compute_keys.instance(instance_id), record,
                              expect_revision=found.mod_revision)
    return CV.DetachPortRequest(instance_id=instance_id, port_id=port_id)


SEEDS.update({
    f"{COMPUTE}/ResizeInstance": _resize,
    f"{COMPUTE}/ConfirmResize": _verify_seed(lambda i: CV.ConfirmResizeRequest(id=i)),
    f"{COMPUTE}/RevertResize": _verify_seed(lambda i: CV.RevertResizeRequest(id=i)),
    f"{COMPUTE}/MigrateInstance": _instance_seed(lambda i: CV.MigrateInstanceRequest(
        id=i, target_node=NODES[1])),
    f"{COMPUTE}/LiveMigrateInstance": _instance_seed(lambda i: CV.LiveMigrateInstanceRequest(
        id=i, target_node=NODES[1])),
    f"{COMPUTE}/EvacuateInstance": _instance_seed(lambda i: CV.EvacuateInstanceRequest(
        id=i, target_node=NODES[1], force=True)),
    f"{COMPUTE}/RebuildInstance": _instance_seed(lambda i: CV.RebuildInstanceRequest(
        id=i, name="rebuilt")),
    f"{COMPUTE}/AttachVolume": _attach_volume,
    f"{COMPUTE}/DetachVolume": _detach_volume,
    f"{COMPUTE}/AttachPort": _attach_port,
    f"{COMPUTE}/DetachPort": _detach_port,
})
