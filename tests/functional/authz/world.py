"""A running identity service with two projects and callers of every kind, for auth tests.

`World` holds project A (admin, member, reader users) and project B (an admin),
a cloud-admin, and tokens that must all be refused: none, expired, forged
(signed by a stranger's key), tampered (payload edited after signing) and
revoked. Other services start their servers against `world.store` and
`world.settings`, and so verify the very same tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import descriptor_pool, message, message_factory
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc

from services.client.channel import CallPolicy, make_channel
from services.common import server
from services.common.settings import (
    AuthSettings,
    EtcdSettings,
    ServiceEndpoint,
    Settings,
    StorageSettings,
    load_settings,
)
from services.common.store import Store
from services.identity import bootstrap, main

ADMIN_PASSWORD = "admin-secret-password"
PASSWORD = "correct horse battery"
# Callers with valid tokens, and tokens every non-public RPC must refuse.
CALLERS = ("cloud_admin", "a_admin", "a_member", "a_reader", "b_admin")
# Callers a row is checked against only when it states an expectation for them:
# `service` holds the cloud-wide service role only (another nubis service).
EXTRA_CALLERS = ("service",)
BAD_TOKENS = ("none", "expired", "forged", "tampered", "revoked")


def service_settings(etcd_endpoint: str, root: str, key_file: Path,
                     redis_url: str = "redis://127.0.0.1:6379/0") -> Settings:
    """Settings for an in-process service: free ports, cheap hashing, a known signing key.

    Services that send agent tasks (storage, network, compute) need `redis_url`
    to reach a running Redis.
    """
    return load_settings(
        redis_url=redis_url,
        etcd=EtcdSettings(endpoints=[etcd_endpoint], prefix=root),
        identity=ServiceEndpoint(port=0),
        # Image bytes of an in-process storage service stay beside the test's keys.
        storage=StorageSettings(port=0, image_dir=str(key_file.parent / "images")),
        auth=AuthSettings(hash_time_cost=1, hash_memory_kib=8192, signing_key_file=str(key_file),
                          admin_password=ADMIN_PASSWORD, revocation_resync=30.0),
    )


def write_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


@dataclass
class Service:
    """One in-process service: its server, background tasks and stop callbacks."""

    running: server.RunningServer
    tasks: list[asyncio.Task[None]]
    parts: server.ServiceParts

    async def stop(self) -> None:
        await self.running.stop(0)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for callback in self.parts.on_stop:
            await callback()


async def start_service(
    build: Callable[[Store, Settings], Awaitable[server.ServiceParts]],
    store: Store, settings: Settings, endpoint: ServiceEndpoint,
) -> Service:
    """What run_service does, minus signals: build, serve on a free port, run background."""
    parts = await build(store, settings)
    running = await server.start(
        endpoint, parts.registrations, settings=settings,
        authenticator=parts.authenticator, public_methods=parts.public_methods,
    )
    return Service(running, server.start_background(parts, running), parts)


@dataclass
class World:
    """Identity plus the named projects, users and tokens of the authorization tests."""

    store: Store
    settings: Settings
    identity: Service
    channel: grpc.aio.Channel
    signing_key: Ed25519PrivateKey
    project_a: str = ""
    project_b: str = ""
    users: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.identity.running.address

    @property
    def stub(self) -> identity_pb2_grpc.IdentityServiceAsyncStub:
        return identity_pb2_grpc.IdentityServiceStub(self.channel)

    def metadata(self, caller: str) -> tuple[tuple[str, str], ...]:
        if caller == "none":
            return ()
        return (("authorization", f"Bearer {self.tokens[caller]}"),)

    async def login(self, username: str, project: str, password: str = PASSWORD) -> str:
        reply = await self.stub.Authenticate(identity_pb2.AuthenticateRequest(
            username=username, password=password, project=project))
        return str(reply.token)

    async def make_user(self, name: str, project_id: str, role: str) -> str:
        """A user with one role on a project (through the API, as the cloud admin)."""
        admin = self.metadata("cloud_admin")
        created = await self.stub.CreateUser(identity_pb2.CreateUserRequest(
            user=identity_pb2.User(meta=resource_pb2.ResourceMeta(name=name)), password=PASSWORD,
        ), metadata=admin)
        await self.stub.GrantRole(identity_pb2.GrantRoleRequest(
            user_id=created.meta.id, project_id=project_id, role=role), metadata=admin)
        return str(created.meta.id)

    async def make_project(self, name: str) -> str:
        created = await self.stub.CreateProject(identity_pb2.CreateProjectRequest(
            project=identity_pb2.Project(meta=resource_pb2.ResourceMeta(name=name))),
            metadata=self.metadata("cloud_admin"))
        return str(created.meta.id)

    async def call(self, service: str, method: str,
                   request: message.Message | Sequence[message.Message],
                   caller: str) -> message.Message:
        """Call any registered RPC by name with `caller`'s token.

        A client stream sends `request` (one message or a sequence of them); a
        server stream answers its first reply.
        """
        descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method)
        reply_type = message_factory.GetMessageClass(descriptor.output_type)
        channel = self.channels.get(service, self.channel)
        kind: Callable[..., Any] = {
            (False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream,
        }[(descriptor.client_streaming, descriptor.server_streaming)]
        stub: Any = kind(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply_type.FromString,
        )
        sent: Any = request
        if descriptor.client_streaming:
            sent = iter([request] if isinstance(request, message.Message) else list(request))
        call = stub(sent, metadata=self.metadata(caller))
        if not descriptor.server_streaming:
            result: message.Message = await call
            return result
        # A watch streams on: its first reply is enough.
        first: message.Message = reply_type()
        async for reply in call:
            first = reply
            break
        call.cancel()
        return first


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _claims(valid_token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(valid_token, options={"verify_signature": False})
    return claims


def bad_tokens(world: World, valid: str) -> dict[str, str]:
    """Expired (right key), forged (wrong key, right kid) and tampered variants of `valid`."""
    header = jwt.get_unverified_header(valid)
    claims = _claims(valid)
    past = dict(claims, iat=time.time() - 7200, exp=int(time.time()) - 3600,
                jti=str(uuid.uuid4()))
    expired = jwt.encode(past, world.signing_key, algorithm="EdDSA", headers={"kid": header["kid"]})
    forged = jwt.encode(dict(claims, jti=str(uuid.uuid4())), Ed25519PrivateKey.generate(),
                        algorithm="EdDSA", headers={"kid": header["kid"]})
    head, _, signature = valid.split(".")
    raised = dict(claims, roles=["admin", "cloud-admin", "member", "reader"])
    tampered = f"{head}.{_b64(raised)}.{signature}"
    return {"expired": expired, "forged": forged, "tampered": tampered}


async def build_world(store: Store, settings: Settings, key: Ed25519PrivateKey) -> World:
    """Start identity and populate projects A and B with one user per caller kind."""
    await bootstrap.ensure_admin(store, settings.auth, ADMIN_PASSWORD)
    identity = await start_service(main.build, store, settings, settings.identity)
    channel = make_channel(identity.running.address)
    world = World(store, settings, identity, channel, key)
    world.tokens["cloud_admin"] = await world.login("admin", settings.auth.admin_project,
                                                    ADMIN_PASSWORD)
    suffix = uuid.uuid4().hex[:6]
    world.project_a = await world.make_project(f"proj-a-{suffix}")
    world.project_b = await world.make_project(f"proj-b-{suffix}")
    plan = {"a_admin": (world.project_a, "admin"), "a_member": (world.project_a, "member"),
            "a_reader": (world.project_a, "reader"), "b_admin": (world.project_b, "admin"),
            "revoked": (world.project_a, "admin"), "grantee": (world.project_a, "reader")}
    for caller, (project_id, role) in plan.items():
        name = f"{caller.replace('_', '-')}-{suffix}"
        world.names[caller] = name
        world.users[caller] = await world.make_user(name, project_id, role)
        world.tokens[caller] = await world.login(name, project_id)
    world.names["service"] = f"service-{suffix}"
    world.users["service"] = await world.make_user(world.names["service"], "", "service")
    world.tokens["service"] = await world.login(world.names["service"],
                                                settings.auth.admin_project)
    await world.stub.RevokeToken(identity_pb2.RevokeTokenRequest(token=world.tokens["revoked"]),
                                 metadata=world.metadata("revoked"))
    world.tokens.update(bad_tokens(world, world.tokens["a_admin"]))
    return world


async def stop_world(world: World) -> None:
    for channel in world.channels.values():
        await channel.close()
    for service in world.services.values():
        await service.stop()
    await world.channel.close()
    await world.identity.stop()


@contextlib.asynccontextmanager
async def running_one_service(
    build: Callable[..., Any], full_name: str, prefix: str,
    etcd_endpoint: str, redis_url: str, directory: Path,
) -> AsyncIterator[tuple[World, Service, grpc.aio.Channel]]:
    """Identity's world and one service (`build`) on a fresh etcd prefix; stopped on exit.

    The channel to the service makes one attempt per call, so a test sees each
    answer as it came.
    """
    root = f"/{prefix}-{uuid.uuid4().hex[:8]}"
    key_file = directory / "signing.pem"
    key = write_key(key_file)
    settings = service_settings(etcd_endpoint, root, key_file, redis_url)
    store = await Store.connect([etcd_endpoint], root=root)
    world = await build_world(store, settings, key)
    try:
        service = await start_service(build, world.store, world.settings,
                                      ServiceEndpoint(host="127.0.0.1", port=0))
        world.services[full_name] = service
        channel = make_channel(service.running.address, policy=CallPolicy(max_attempts=1))
        world.channels[full_name] = channel
        yield world, service, channel
    finally:
        await stop_world(world)
        await store.close()
