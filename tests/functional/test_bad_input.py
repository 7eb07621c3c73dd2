"""Bad input of every kind gets a clean gRPC error, and nothing stored is lost or corrupted.

Every RPC of every service (identity, scheduler, compute, storage and
network; each RPC has a seed) is called by a cloud-admin and by a
project member with the empty request, with hostile requests generated from
its input descriptor (tests.functional.request_fuzz), with valid requests
(tests.functional.bad_input_seeds) broken in one field, and with bytes that
are not a valid message. No answer may be UNKNOWN, INTERNAL, DATA_LOSS or a
timeout, carry traceback text, or be an error without a google.rpc ErrorInfo
reason. Generated ids point at resources made for the fuzz (a project of its
own for the cloud-admin, project A's for the member), so mutations succeed
too; afterwards every stored record still decodes cleanly as its type and
sits under a sane key, and every record of project B, of the bootstrap admin
and of every caller is byte-identical. Inputs once found mishandled are
pinned at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, message, wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nubis.common.v1 import request_pb2, resource_pb2
from nubis.compute.v1 import (
    compute_service_pb2,
    flavor_pb2,
    instance_action_pb2,
    instance_pb2,
    keypair_pb2,
)
from nubis.compute.v1 import operation_pb2 as compute_operation_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import (
    floating_ip_pb2,
    ipam_pb2,
    network_pb2,
    network_service_pb2,
    port_pb2,
    router_pb2,
    security_group_pb2,
    subnet_pb2,
)
from nubis.scheduler.v1 import scheduler_pb2
from nubis.storage.v1 import (
    attachment_pb2,
    image_pb2,
    operation_pb2,
    pool_pb2,
    snapshot_pb2,
    storage_service_pb2,
    volume_pb2,
)
from pydantic import SecretStr

from services.client.channel import make_channel
from services.common import auth, quota, requests
from services.common.settings import NetworkSettings, ServiceAuthSettings, ServiceEndpoint
from services.common.store import Store
from services.compute import keys as compute_keys
from services.compute import main as compute_main
from services.identity import keys as identity_keys
from services.network import keys as network_keys
from services.network import main as network_main
from services.scheduler import keys
from services.scheduler import main as scheduler_main
from services.storage import image_store
from services.storage import keys as storage_keys
from services.storage import main as storage_main
from tests.conftest import EtcdEndpoint, RedisEndpoint
from tests.functional import bad_input_seeds as seeds
from tests.functional import request_fuzz
from tests.functional.authz.world import (
    PASSWORD,
    World,
    build_world,
    service_settings,
    start_service,
    stop_world,
    write_key,
)

IDENTITY = seeds.IDENTITY
SCHEDULER = seeds.SCHEDULER
COMPUTE = "nubis.compute.v1.ComputeService"
STORAGE = "nubis.storage.v1.StorageService"
NETWORK = "nubis.network.v1.NetworkService"
SERVICES = (IDENTITY, SCHEDULER, COMPUTE, STORAGE, NETWORK)
CALLERS = ("cloud_admin", "a_member")
# Loaded so the descriptor pool knows every service this module calls.
_MODULES = (identity_pb2, scheduler_pb2, compute_service_pb2, storage_service_pb2,
            network_service_pb2)

# What each prefix of the keyspace holds (the longest matching prefix wins).
STORED_TYPES: dict[str, tuple[type[message.Message], ...]] = {
    identity_keys.PROJECTS: (identity_pb2.Project,),
    identity_keys.PROJECT_NAMES: (identity_pb2.NameIndex,),
    identity_keys.USERS: (identity_pb2.User,),
    identity_keys.USER_NAMES: (identity_pb2.NameIndex,),
    identity_keys.CREDENTIALS: (identity_pb2.Credential,),
    identity_keys.ROLES: (identity_pb2.RoleAssignment,),
    identity_keys.CATALOG: (identity_pb2.Endpoint,),
    identity_keys.SIGNING_KEY: (identity_pb2.PrivateSigningKey,),
    identity_keys.PUBLIC_KEYS: (identity_pb2.SigningKey,),
    identity_keys.REVOKED: (identity_pb2.RevokedToken,),
    auth.REVOKED_SUBJECTS_PREFIX: (identity_pb2.RevokedSubject,),
    quota.quota_key(""): (identity_pb2.Quota,),
    identity_keys.QUOTA_DEFAULTS: (identity_pb2.Quota,),
    identity_keys.LOGIN_FAILURES: (identity_pb2.LoginFailures,),
    quota.legacy_usage_key(""): (identity_pb2.Usage,),
    # Every service keeps its create idempotency keys here, in one format.
    requests.PREFIX: (request_pb2.RequestRecord,),
    keys.NODE_REPORTS: (scheduler_pb2.NodeReport,),
    keys.NODE_SETTINGS: (scheduler_pb2.NodeSettings,),
    keys.NODE_USAGE: (scheduler_pb2.NodeUsage,),
    keys.ALLOCATIONS: (scheduler_pb2.ConsumerAllocations,),
    keys.SERVER_GROUPS: (scheduler_pb2.ServerGroup,),
    keys.DEFAULT_RATIOS: (scheduler_pb2.DefaultAllocationRatios,),
    storage_keys.IMAGES: (image_pb2.Image,),
    storage_keys.IMAGE_USERS: (image_pb2.ImageUser,),
    storage_keys.IMAGE_UPLOADS: (image_pb2.ImageUpload,),
    storage_keys.VOLUMES: (volume_pb2.Volume,),
    storage_keys.SNAPSHOTS: (snapshot_pb2.Snapshot,),
    storage_keys.ATTACHMENTS: (attachment_pb2.VolumeAttachment,),
    storage_keys.POOLS: (pool_pb2.StoragePool,),
    storage_keys.OPERATIONS: (operation_pb2.Operation,),
    storage_keys.VOLUME_SNAPSHOTS: (wrappers_pb2.StringValue,),
    storage_keys.SNAPSHOT_USERS: (wrappers_pb2.StringValue,),
    storage_keys.ROOT_DISKS: (wrappers_pb2.StringValue,),
    network_keys.SECURITY_GROUPS: (security_group_pb2.SecurityGroup,),
    network_keys.SECURITY_GROUP_RULES: (security_group_pb2.SecurityGroupRule,),
    network_keys.SECURITY_GROUP_NAMES: (resource_pb2.ResourceMeta,),
    network_keys.ROUTERS: (router_pb2.Router,),
    network_keys.FLOATING_IPS: (floating_ip_pb2.FloatingIp,),
    network_keys.FLOATING_IP_TARGETS: (resource_pb2.ResourceMeta,),
    network_keys.NETWORKS: (network_pb2.Network,),
    network_keys.SUBNETS: (subnet_pb2.Subnet,),
    network_keys.PORTS: (port_pb2.Port,),
    network_keys.IPAM: (ipam_pb2.IpAllocation,),
    network_keys.MACS: (ipam_pb2.MacAllocation,),
    network_keys.SEGMENTS: (ipam_pb2.SegmentAllocation,),
    network_keys.ATTACHMENTS: (ipam_pb2.NetworkAttachments,),
    network_keys.NETWORK_PORTS: (ipam_pb2.PortRef,),
    network_keys.REALIZE: (ipam_pb2.PendingRealization,),
    compute_keys.FLAVORS: (flavor_pb2.Flavor,),
    compute_keys.FLAVOR_NAMES: (resource_pb2.ResourceMeta,),
    compute_keys.DEFAULT_FLAVORS: (wrappers_pb2.StringValue,),
    compute_keys.KEYPAIRS: (keypair_pb2.KeyPair,),
    compute_keys.KEYPAIR_NAMES: (resource_pb2.ResourceMeta,),
    compute_keys.INSTANCES: (instance_pb2.Instance,),
    compute_keys.ACTIONS: (instance_action_pb2.InstanceAction,),
    compute_keys.OPERATIONS: (compute_operation_pb2.Operation,),
}
# Rewritten by background work whatever the requests do (heartbeats, leases).
VOLATILE_PREFIXES = (identity_keys.CATALOG, keys.NODE_REPORTS, requests.PREFIX)

_FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_GARBAGE = settings(_FUZZ, max_examples=10)


@dataclass
class Arena:
    """Every service on one store, the fuzz targets per caller, and the store's baselines."""

    world: World
    targets: dict[str, seeds.Target]
    protected: frozenset[str]
    # The cloud-admin's own project: its fuzzed creates that name no project land
    # there, and count in that project's usage records (under this prefix), as they should.
    admin_usage: str = ""
    baselines: dict[str, dict[str, bytes]] = field(default_factory=dict)
    seed_requests: dict[tuple[str, str], message.Message] = field(default_factory=dict)

    def __repr__(self) -> str:
        # Hypothesis prints every argument of a failing example; the whole world is noise.
        return f"Arena(root={self.world.store.root!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def channel(self, service: str) -> grpc.aio.Channel:
        return self.world.channels.get(service, self.world.channel)


def _method(full_name: str) -> descriptor.MethodDescriptor:
    service, method = full_name.split("/")
    found: descriptor.MethodDescriptor = (
        descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method))
    return found


def _methods(services: Sequence[str]) -> list[str]:
    pool = descriptor_pool.Default()
    return [f"{name}/{method.name}" for name in services
            for method in pool.FindServiceByName(name).methods]


def _swept() -> list[str]:
    """Every RPC of every service."""
    return _methods(SERVICES)


def _cases() -> list[object]:
    return [pytest.param(method, caller, id=f"{method.rsplit('.', 1)[-1]}-{caller}")
            for method in _swept() for caller in CALLERS]


async def _start_services(world: World) -> None:
    for name in seeds.NODES:
        await world.store.create(keys.node_report(name), scheduler_pb2.NodeReport(
            name=name, capacity=scheduler_pb2.Resources(vcpus=64, memory_mb=262144,
                                                        disk_gb=10000),
            availability_zone="nova", queue=f"node.{name}"))
    # Services call each other (storage asks the scheduler for nodes) as the
    # world's service user, through identity's catalog.
    world.settings.identity.port = int(world.address.rsplit(":", 1)[1])
    world.settings.service_auth = ServiceAuthSettings(
        user=world.names["service"], password=SecretStr(PASSWORD),
        project=world.settings.auth.admin_project)
    # No agent runs here: a bind gives its node half a second, then stays BUILD.
    world.settings.networking = NetworkSettings(realize_timeout=0.5, realize_interval=30.0)
    builds = {SCHEDULER: scheduler_main.build, COMPUTE: compute_main.build,
              STORAGE: storage_main.build, NETWORK: network_main.build}
    for full_name, build in builds.items():
        service = await start_service(build, world.store, world.settings,
                                      ServiceEndpoint(host="127.0.0.1", port=0))
        world.services[full_name] = service
        world.channels[full_name] = make_channel(service.running.address)


async def _targets(world: World) -> dict[str, seeds.Target]:
    """For the cloud-admin: resources in a project of its own; for the member: in project A."""
    suffix = uuid.uuid4().hex[:6]
    project = await world.make_project(f"fuzz-target-{suffix}")
    victim = await world.make_project(f"fuzz-victim-{suffix}")
    found = {}
    for caller, home in (("cloud_admin", project), ("a_member", world.project_a)):
        user_name, drawn_name = f"fodder-{caller[0]}-{suffix}", f"drawn-{caller[0]}-{suffix}"
        user = await world.make_user(user_name, home, "reader")
        drawn = (victim if caller == "cloud_admin" else home,
                 await world.make_user(drawn_name, home, "reader"),
                 await seeds.group(world, home, caller), await seeds.placed(world, home))
        found[caller] = seeds.Target(
            home, await _project_name(world, home), user, user_name,
            await seeds.group(world, home, caller), await seeds.placed(world, home),
            drawn, (f"fuzz-victim-{suffix}", drawn_name))
    return found


async def _project_name(world: World, project_id: str) -> str:
    reply = await world.call(IDENTITY, "GetProject", identity_pb2.GetProjectRequest(id=project_id),
                             "cloud_admin")
    assert isinstance(reply, identity_pb2.Project)
    return reply.meta.name


async def _admin_usage(world: World) -> str:
    admin_project = await world.store.get(
        identity_keys.project_name(world.settings.auth.admin_project), identity_pb2.NameIndex)
    return quota.legacy_usage_key(admin_project.value.id)


async def _protected(world: World) -> frozenset[str]:
    """Ids whose records no fuzzed request may change: project B, the admin, every caller."""
    admin = await world.store.get(identity_keys.user_name(world.settings.auth.admin_user),
                                  identity_pb2.NameIndex)
    admin_project = await world.store.get(
        identity_keys.project_name(world.settings.auth.admin_project), identity_pb2.NameIndex)
    return frozenset({world.project_b, admin.value.id, admin_project.value.id,
                      *world.users.values()})


@pytest.fixture(scope="module")
async def arena(etcd: EtcdEndpoint, redis: RedisEndpoint,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Arena]:
    root = f"/test-bad-input-{uuid.uuid4().hex[:8]}"
    key_file = tmp_path_factory.mktemp("bad-input-keys") / "signing.pem"
    key = write_key(key_file)
    settings_ = service_settings(etcd.endpoint, root, key_file, redis.url)
    store = await Store.connect([etcd.endpoint], root=root)
    world = await build_world(store, settings_, key)
    try:
        await _start_services(world)
        built = Arena(world, await _targets(world), await _protected(world),
                      await _admin_usage(world))
        yield built
    finally:
        await stop_world(world)
        await store.close()


async def _baseline(arena: Arena, service: str) -> None:
    """The keyspace before the first fuzzed call to `service`."""
    if service not in arena.baselines:
        arena.baselines[service] = await request_fuzz.snapshot(arena.world.store)


async def _send(arena: Arena, method: str, caller: str, payload: bytes
                ) -> request_fuzz.Outcome:
    return await request_fuzz.call_raw(arena.channel(method.split("/")[0]), _method(method),
                                       payload, arena.world.metadata(caller))


def _check(outcome: request_fuzz.Outcome, method: str, caller: str, payload: bytes) -> None:
    problems = outcome.problems()
    if "nubis.unimplemented" in outcome.reasons:
        problems.append("answered as a stub: every RPC is implemented")
    assert not problems, (
        f"{method} as {caller} with {request_fuzz.printable(payload)} → {outcome.code.name} "
        f"{outcome.details[:300]!r}: {problems}")


@pytest.mark.parametrize(("method", "caller"), _cases())
async def test_empty_request(arena: Arena, method: str, caller: str) -> None:
    await _baseline(arena, method.split("/")[0])
    _check(await _send(arena, method, caller, b""), method, caller, b"")


async def _fuzz_one(arena: Arena, method: str, caller: str, request: message.Message) -> None:
    payload = request.SerializeToString()
    outcome = await _send(arena, method, caller, payload)
    _check(outcome, method, caller, payload)


@pytest.mark.parametrize(("method", "caller"), _cases())
@_FUZZ
@given(data=st.data())
async def test_fuzzed_requests(arena: Arena, method: str, caller: str, data: st.DataObject
                               ) -> None:
    await _baseline(arena, method.split("/")[0])
    strategies = arena.targets[caller].strategies
    request = data.draw(strategies.request(_method(method).input_type), "request")
    await _fuzz_one(arena, method, caller, request)


async def _seed(arena: Arena, method: str, caller: str) -> message.Message:
    """The valid request to break, made once per method and caller."""
    if (method, caller) not in arena.seed_requests:
        made = await seeds.SEEDS[method](arena.world, arena.targets[caller])
        arena.seed_requests[(method, caller)] = made
    return arena.seed_requests[(method, caller)]


@pytest.mark.parametrize(("method", "caller"), _cases())
@_FUZZ
@given(data=st.data())
async def test_one_bad_field(arena: Arena, method: str, caller: str, data: st.DataObject
                             ) -> None:
    await _baseline(arena, method.split("/")[0])
    seed = await _seed(arena, method, caller)
    request = data.draw(arena.targets[caller].strategies.one_bad_field(seed), "request")
    await _fuzz_one(arena, method, caller, request)


def test_every_implemented_rpc_has_a_seed() -> None:
    assert sorted(set(_swept()) - set(seeds.SEEDS)) == []


@pytest.mark.parametrize(("method", "caller"), _cases())
async def test_malformed_bytes(arena: Arena, method: str, caller: str) -> None:
    """Bytes that are no message at all: refused as undecodable, never a server fault."""
    await _baseline(arena, method.split("/")[0])
    for payload in request_fuzz.MALFORMED[:4]:
        outcome = await _send(arena, method, caller, payload)
        _check(outcome, method, caller, payload)
        allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
        assert outcome.code in allowed, (method, payload, outcome)
        if outcome.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "nubis.request.undecodable" in outcome.reasons, (method, payload, outcome)


@pytest.mark.parametrize(("method", "caller"), _cases())
@_GARBAGE
@given(payload=request_fuzz.garbage_bytes())
async def test_garbage_bytes(arena: Arena, method: str, caller: str, payload: bytes) -> None:
    await _baseline(arena, method.split("/")[0])
    _check(await _send(arena, method, caller, payload), method, caller, payload)


def _protected_keys(arena: Arena, before: dict[str, bytes]) -> list[str]:
    """Keys that name, or whose records mention, a protected id (background-written ones aside)."""
    return [key for key, raw in before.items() if not key.startswith(VOLATILE_PREFIXES)
            and not (arena.admin_usage and key.startswith(arena.admin_usage))
            and any(marker in key or marker.encode() in raw for marker in arena.protected)]


@pytest.mark.parametrize("service", SERVICES)
async def test_store_intact(arena: Arena, service: str) -> None:
    """After the fuzz: every record decodes as its type; protected records are untouched."""
    before = arena.baselines.get(service)
    if before is None:
        pytest.skip(f"no fuzz of {service} ran in this session")
    after = await request_fuzz.snapshot(arena.world.store)
    undecodable = [problem for key, raw in after.items()
                   for problem in request_fuzz.decode_problems(key, raw, STORED_TYPES)]
    assert not undecodable, undecodable
    protected = _protected_keys(arena, before)
    # The check must cover something: project B's record and every caller's.
    assert identity_keys.project(arena.world.project_b) in protected
    assert {identity_keys.user(user_id) for user_id in arena.world.users.values()} <= set(protected)
    changed = [f"{key}: {'changed' if key in after else 'deleted'}" for key in protected
               if after.get(key) != before[key]]
    assert not changed, changed


# Inputs the fuzz once found mishandled, pinned so they stay fixed.
def _pinned(arena: Arena) -> list[tuple[str, message.Message, grpc.StatusCode, str]]:
    """(method, request, code, field violated or ErrorInfo reason) as the cloud-admin."""
    target = arena.targets["cloud_admin"]
    auth_as = {"username": target.user_name, "password": PASSWORD}
    return [
        # Any string became a key under identity/revoked/ (control characters too).
        (f"{IDENTITY}/RevokeToken", identity_pb2.RevokeTokenRequest(token_id="../\x00"),
         grpc.StatusCode.INVALID_ARGUMENT, "token_id"),
        # Names that cannot exist reached the store, whose key error leaked the key layout.
        (f"{IDENTITY}/Authenticate", identity_pb2.AuthenticateRequest(
            username="../", password=PASSWORD),
         grpc.StatusCode.UNAUTHENTICATED, "nubis.auth.invalid_credentials"),
        (f"{IDENTITY}/Authenticate", identity_pb2.AuthenticateRequest(
            username="x" * 2000, password=PASSWORD),
         grpc.StatusCode.UNAUTHENTICATED, "nubis.auth.invalid_credentials"),
        (f"{IDENTITY}/Authenticate", identity_pb2.AuthenticateRequest(**auth_as, project="../"),
         grpc.StatusCode.PERMISSION_DENIED, "nubis.auth.no_role"),
        # `$` matches before a trailing newline: such names were stored, such ids looked up.
        (f"{IDENTITY}/CreateProject", identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(name="trailing\n"))),
         grpc.StatusCode.INVALID_ARGUMENT, "project.meta.name"),
        (f"{IDENTITY}/GetProject", identity_pb2.GetProjectRequest(id=f"{target.project}\n"),
         grpc.StatusCode.INVALID_ARGUMENT, "id"),
        (f"{SCHEDULER}/GetNode", scheduler_pb2.GetNodeRequest(name=f"{seeds.NODES[0]}\n"),
         grpc.StatusCode.INVALID_ARGUMENT, "name"),
        # A message quoting 100 kB of input made a status too big for gRPC headers.
        (f"{IDENTITY}/CreateProject", identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(
                name=request_fuzz.HUGE_UNICODE))),
         grpc.StatusCode.INVALID_ARGUMENT, "project.meta.name"),
        (f"{SCHEDULER}/GetServerGroup", scheduler_pb2.GetServerGroupRequest(
            id=request_fuzz.HUGE_UNICODE), grpc.StatusCode.INVALID_ARGUMENT, "id"),
    ]


async def test_pinned_cases(arena: Arena) -> None:
    before = await request_fuzz.snapshot(arena.world.store)
    for method, request, code, named in _pinned(arena):
        payload = request.SerializeToString()
        outcome = await _send(arena, method, "cloud_admin", payload)
        _check(outcome, method, "cloud_admin", payload)
        fields = {violation.field for bad in outcome.bad_request
                  for violation in bad.field_violations}
        assert (outcome.code, named in fields | outcome.reasons) == (code, True), (
            method, outcome)
        assert len(outcome.details.encode()) <= 512, (method, len(outcome.details))
    after = await request_fuzz.snapshot(arena.world.store)
    assert set(after) - set(before) <= {
        key for key in after if key.startswith(identity_keys.CATALOG)}


def _shared_id_requests(request_id: str) -> dict[str, message.Message]:
    return {
        f"{SCHEDULER}/CreateServerGroup": scheduler_pb2.CreateServerGroupRequest(
            server_group=scheduler_pb2.ServerGroup(meta=resource_pb2.ResourceMeta(name="shared"),
                                                   policy=scheduler_pb2.AFFINITY),
            request_id=request_id),
        f"{IDENTITY}/CreateProject": identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(
                name=f"shared-{uuid.uuid4().hex[:8]}")), request_id=request_id),
    }


@pytest.mark.parametrize("first", [SCHEDULER, IDENTITY])
async def test_request_id_used_by_another_service(arena: Arena, first: str) -> None:
    """Both services keep a project's request ids under requests/: a reuse is ALREADY_EXISTS."""
    requests = sorted(_shared_id_requests(f"shared-{uuid.uuid4().hex[:8]}").items(),
                      key=lambda item: not item[0].startswith(first))
    codes = []
    for method, request in requests:
        payload = request.SerializeToString()
        outcome = await _send(arena, method, "cloud_admin", payload)
        _check(outcome, method, "cloud_admin", payload)
        codes.append((outcome.code, outcome.reasons))
    assert codes == [(grpc.StatusCode.OK, set()),
                     (grpc.StatusCode.ALREADY_EXISTS, {"nubis.request_id.reused"})], codes


def _upload_streams(image_id: str, foreign_id: str) -> dict[str, list[bytes]]:
    """Upload streams of every bad shape, for a fresh QUEUED image (named by its id)."""
    def header(**fields: Any) -> bytes:
        sent = image_pb2.ImageUploadHeader(image_id=image_id, **fields)
        return image_pb2.UploadImageRequest(header=sent).SerializeToString()

    def chunk(data: bytes) -> bytes:
        return image_pb2.UploadImageRequest(chunk=data).SerializeToString()

    return {
        "empty": [],
        "chunk first": [chunk(b"x" * 100)],
        "two headers": [header(), header()],
        "undecodable chunk": [header(), request_fuzz.MALFORMED[0]],
        "chunk over 1 MiB": [header(), chunk(b"y" * ((1 << 20) + 1))],
        "more than declared": [header(size_bytes=10), chunk(b"z" * 20)],
        "negative size": [header(size_bytes=-1), chunk(b"z")],
        "size over the cap": [header(size_bytes=1 << 62), chunk(b"z")],
        "bad checksum text": [header(checksum_sha256="zz"), chunk(b"z")],
        "wrong checksum": [header(checksum_sha256="0" * 64), chunk(b"z" * 512)],
        "no bytes": [header()],
        "unknown image": [image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id=str(uuid.uuid4()))).SerializeToString(), chunk(b"z")],
        # A cloud-admin sees it: the wrong checksum keeps project B's image from changing.
        "another project's image": [image_pb2.UploadImageRequest(
            header=image_pb2.ImageUploadHeader(image_id=foreign_id, checksum_sha256="0" * 64)
        ).SerializeToString(), chunk(b"z")],
        "not an id": [image_pb2.UploadImageRequest(header=image_pb2.ImageUploadHeader(
            image_id="../../etc/passwd")).SerializeToString(), chunk(b"z")],
    }


@pytest.mark.parametrize("caller", CALLERS)
async def test_bad_upload_streams(arena: Arena, caller: str) -> None:
    """Streams of the wrong shape are refused cleanly; no bytes stay, no image turns ACTIVE."""
    method = _method(f"{STORAGE}/UploadImage")
    target = arena.targets[caller]
    foreign = await seeds.image(arena.world, arena.world.project_b)
    bytes_store = image_store.DirectoryImageStore(arena.world.settings.storage.image_dir)
    for shape, payloads in _upload_streams("", foreign).items():
        image_id = await seeds.image(arena.world, target.project)
        payloads = _upload_streams(image_id, foreign)[shape]
        outcome = await request_fuzz.call_raw_stream(
            arena.channel(STORAGE), method, payloads, arena.world.metadata(caller))
        _check(outcome, method.full_name, caller, b"".join(payloads)[:200])
        expected = grpc.StatusCode.INVALID_ARGUMENT
        if shape == "unknown image" or (shape == "another project's image"
                                        and caller != "cloud_admin"):
            expected = grpc.StatusCode.NOT_FOUND
        assert outcome.code == expected, (shape, outcome)
        record = await arena.world.store.get(storage_keys.image(image_id), image_pb2.Image)
        assert record.value.state in (image_pb2.Image.QUEUED, image_pb2.Image.ERROR), shape
        assert not bytes_store.path(image_id).exists(), shape
        assert bytes_store.staged_files(image_id) == [], shape
