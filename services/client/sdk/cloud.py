"""A connection to one nubis cloud: where identity is, who calls, and a typed client per service.

`connect()` finds identity the way the `nubis` CLI does (explicit arguments,
then `NUBIS_IDENTITY_ADDR`, the named cloud of clouds.yaml, the lab in
`NUBIS_LAB_DIR` or ./.nubis-lab, the user's config.toml) and the caller's token
likewise (a password given logs in and renews its token before it expires;
else `NUBIS_TOKEN`, else what `nubis login` saved). Every other service is
found in identity's catalog, calls are spread over its replicas and a call
that finds one unavailable goes to the next (services.client.peers.caller).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from services.client import channel as channels
from services.client import peers
from services.client.peers import stubs
from services.client.peers import token as tokens
from services.client.peers.settings import ClientSettings, ServiceCredential
from services.client.sdk import config, waiters
from services.common import errors, resources
from services.common.settings import TlsSettings

NO_TOKEN = "nubis.client.no_token"
# Seconds a dial of one catalog replica may take before the next one is tried.
_DIAL_TIMEOUT = 2.0


class Cloud:
    """A typed client of every nubis service, sharing one token, catalog and set of channels.

    Use it as ``async with nubis.connect() as cloud:``, or call `close` when done.
    Each RPC is ``await cloud.<service>.<Method>(request)`` and returns the reply
    message or raises the service's error as a services.common.errors class
    (NotFound, InvalidArgument with its field violations, ...; see nubis.errors):
    each carries `code` (the gRPC status name), `reason` and `message`.
    """

    def __init__(self, settings: ClientSettings, *, token: str | None = None) -> None:
        self.settings = settings
        # The services' own typed clients, with the caller's token instead of a
        # service credential's when one is given.
        self._clients = peers.ServiceClients(
            settings, token=tokens.StaticToken(token) if token is not None else None)
        self._caller = self._clients.caller
        self.identity = self._clients.identity
        self.compute = self._clients.compute
        self.storage = self._clients.storage
        self.network = self._clients.network
        self.scheduler = self._clients.scheduler
        self._channels: list[grpc.aio.Channel] = []

    async def __aenter__(self) -> Cloud:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel (calls still running are cancelled)."""
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        await self._clients.close()

    async def token(self) -> str:
        """The bearer token calls carry now (a login when a password was given and none is held)."""
        return await self._caller.token.current()

    async def endpoints(self, service: str) -> list[str]:
        """Every address identity's catalog lists for `service` (identity, and a service
        given in the settings' `endpoints`: the one configured)."""
        if service == stubs.IdentityClient.NAME:
            return [self.settings.identity_address]
        if service in self.settings.endpoints:
            return [self.settings.endpoints[service]]
        return await self._caller.list_endpoints(service)

    async def channel(self, service: str, *, call_timeout: float = 10.0,
                      policy: channels.CallPolicy | None = None) -> grpc.aio.Channel:
        """A raw grpc channel to a live replica of `service`, with this cloud's token on every
        call and `call_timeout` as the default deadline of unary calls (or `policy`'s).

        For what the typed clients do not declare (the CLI's image upload, a client
        stream) and callers of the generated stubs: the catalog's replicas are dialled
        in turn and the first that connects is used, so one that died but is still
        listed is skipped. Its failures are grpc errors. Closed with the cloud.
        """
        addresses = await self.endpoints(service)
        if not addresses:
            raise errors.Unavailable(f"no {service} endpoint is registered in the catalog",
                                     reason="nubis.client.no_endpoint",
                                     metadata={"service": service})
        bearer = await self.token()
        address = await first_live(addresses, self.settings.tls)
        made = channels.make_channel(address, settings=self.settings.tls, token=bearer,
                                     policy=policy or channels.CallPolicy(timeout=call_timeout))
        self._channels.append(made)
        return made

    async def find(self, kind: str, ref: str) -> Any:
        """The resource of `kind` (flavor, server, image, volume, snapshot, network, subnet,
        port, router, security_group, server_group) whose id or name is `ref`; NotFound
        if none is visible, FailedPrecondition if several share the name."""
        found = _KINDS.get(kind)
        if found is None:
            raise errors.InvalidArgument(f"no resource kind {kind!r}", violations=[
                errors.FieldViolation("kind", "one of " + ", ".join(sorted(_KINDS)))])
        client = getattr(self, found[0])
        singular, plural = found[1], found[2]
        if resources.is_uuid(ref):
            get = getattr(client, f"Get{singular}")
            return await get(get.rpc.request(id=ref))
        listing = getattr(client, f"List{plural}")
        if any(ch.isspace() or ch in ",=" for ch in ref):
            raise errors.InvalidArgument(f"{kind} {ref!r} is neither an id nor a plain name",
                                         violations=[errors.FieldViolation("ref", "an id or "
                                                                           "a name")])
        reply = await listing(listing.rpc.request(filter=f"name={ref}"))
        items = list(getattr(reply, _snake(plural)))
        if len(items) == 1:
            return items[0]
        if not items:
            raise errors.NotFound(f"no {kind} named {ref!r}", reason="nubis.client.no_such_name")
        raise errors.FailedPrecondition(f"more than one {kind} named {ref!r}; give its id",
                                        reason="nubis.client.ambiguous_name")

    async def wait_for_instance(self, instance_id: str, *states: int | str,
                                within: float = 600.0) -> Any:
        """The instance once it settles in one of `states` (default ACTIVE): its
        operation finished. Raises waiters.ResourceFailed if it settles elsewhere
        with a fault or goes to ERROR, NotFound if it is deleted (unless DELETED is
        asked for), waiters.WaitTimeout after `within` seconds. Built on
        WatchInstances from the instance's revision, so no change is missed."""
        return await waiters.wait(waiters.INSTANCES, self.compute, instance_id, states,
                                  within=within)

    async def wait_for_volume(self, volume_id: str, *states: int | str,
                              within: float = 600.0) -> Any:
        """The volume once it is in one of `states` (default AVAILABLE) with nothing in
        flight; as wait_for_instance, on WatchVolumes."""
        return await waiters.wait(waiters.VOLUMES, self.storage, volume_id, states,
                                  within=within)

    async def wait_for_port(self, port_id: str, *states: int | str,
                            within: float = 120.0) -> Any:
        """The port once it is in one of `states` (default ACTIVE); as wait_for_instance,
        on WatchPorts."""
        return await waiters.wait(waiters.PORTS, self.network, port_id, states, within=within)


# kind -> (the Cloud's client, the RPCs' singular and plural words)
_KINDS = {
    "flavor": ("compute", "Flavor", "Flavors"),
    "server": ("compute", "Instance", "Instances"),
    "image": ("storage", "Image", "Images"),
    "volume": ("storage", "Volume", "Volumes"),
    "snapshot": ("storage", "Snapshot", "Snapshots"),
    "network": ("network", "Network", "Networks"),
    "subnet": ("network", "Subnet", "Subnets"),
    "port": ("network", "Port", "Ports"),
    "router": ("network", "Router", "Routers"),
    "security_group": ("network", "SecurityGroup", "SecurityGroups"),
    "server_group": ("scheduler", "ServerGroup", "ServerGroups"),
}


def _snake(word: str) -> str:
    return "".join(f"_{ch.lower()}" if ch.isupper() else ch for ch in word).lstrip("_")


async def first_live(addresses: list[str], tls: TlsSettings | None) -> str:
    """The first of `addresses` that accepts a connection, dialled in turn, each for at most
    _DIAL_TIMEOUT (a refused dial answers at once); the last one when none before it did.

    A replica that died stays in the catalog until its lease expires: this is
    how a caller of a raw channel (the CLI) skips it.
    """
    for address in addresses[:-1]:
        probe = channels.make_channel(address, settings=tls,
                                      policy=channels.CallPolicy(max_attempts=1))
        try:
            if await _connects(probe):
                return address
        finally:
            await probe.close()
    return addresses[-1]


async def _connects(channel: grpc.aio.Channel) -> bool:
    try:
        async with asyncio.timeout(_DIAL_TIMEOUT):
            state = channel.get_state(try_to_connect=True)
            while state is not grpc.ChannelConnectivity.READY:
                if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


def connect(cloud: str | None = None, *, identity: str | None = None,
            username: str | None = None, password: str | None = None,
            project: str | None = None, token: str | None = None,
            tls: TlsSettings | None = None, lab_dir: str | os.PathLike[str] | None = None,
            attempts: int = 5) -> Cloud:
    """A `Cloud` for the named cloud of clouds.yaml, or the lab, or what the arguments say.

    - identity: "host:port" of identity (else NUBIS_IDENTITY_ADDR, the cloud, the lab,
      the user's config.toml, 127.0.0.1:7500).
    - username / password / project: log in, and log in again before the token
      expires. Without them: `token`, else NUBIS_TOKEN, else the token `nubis
      login` saved (for the cloud, the lab or the user).
    - tls: how to dial (else the cloud's CA and certificate, else the lab's).
    - attempts: tries of a call that finds replicas unavailable, each on the next one.

    Nothing is dialled until the first call. Make it inside the event loop that uses it.
    """
    context = config.CloudConfig(
        identity=identity or os.environ.get("NUBIS_IDENTITY_ADDR") or None,
        lab_dir=Path(lab_dir) if lab_dir is not None else config.default_lab_dir(),
        cloud=cloud or os.environ.get("NUBIS_CLOUD") or None)
    credential = None
    if username or password:
        if not (username and password):
            raise errors.InvalidArgument(
                "give both username and password, or neither",
                violations=[errors.FieldViolation("username" if not username else "password",
                                                  "required with the other")])
        credential = ServiceCredential(username, password, project or "")
    else:
        token = token or context.token()
        if not token:
            raise errors.Unauthenticated(
                "no credentials: pass username and password (or token), set NUBIS_TOKEN, "
                "or run `nubis login`", reason=NO_TOKEN)
    settings = ClientSettings(identity_address=context.identity_address(),
                              credential=credential, tls=tls or context.tls())
    return Cloud(dataclasses.replace(settings, attempts=attempts),
                 token=None if credential else token)

