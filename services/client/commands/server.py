"""`nubis server ...`: boot servers and drive their lifecycle (power, resize, migrate,
evacuate, hot-plug), read their console and actions, and watch them change.

Every verb is asynchronous on the service; `--wait` follows the server to a final
state (server_wait.py) and exits non-zero naming the fault if it went to ERROR.
A command that takes names resolves them with the owning service's List filter:
flavors through compute, images and volumes through storage, networks and ports
through network, server groups through the scheduler.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    instance_action_pb2,
    instance_pb2,
    instance_requests_pb2,
    instance_verbs_pb2,
)
from nubis.network.v1 import network_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.client import cli_context
from services.client.commands import flavor as flavor_cli
from services.client.commands import image as image_cli
from services.client.commands import network as network_cli
from services.client.commands import server_defaults, server_wait, service_call
from services.client.commands import volume as volume_cli
from services.client.sdk import cloud as sdk_cloud
from services.common import errors

T = TypeVar("T")
Instance = instance_pb2.Instance
R, V, A = instance_requests_pb2, instance_verbs_pb2, instance_action_pb2

app = typer.Typer(help="Servers: boot, power, resize, migrate, hot-plug, console, watch.",
                  no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. "
                                     "'state=ACTIVE,ERROR'.")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow it to a final state (progress on "
                                    "a terminal); non-zero exit if it goes to ERROR.")]
Timeout = Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds --wait waits at "
                                        "most.")]
TargetNode = Annotated[str, typer.Option("--target-node", help="Destination node "
                                         "(default: the scheduler's choice).")]
_ACTIVE = frozenset({Instance.ACTIVE})
# `server watch` runs until Ctrl-C, not for the declared hour of a watch.
_WATCH_UNTIL_STOPPED = 365 * 24 * 3600.0


def run(ctx: typer.Context, action: Callable[[sdk_cloud.Cloud], Awaitable[T]]) -> T:
    """Run one session of calls (compute, and whichever other services it needs)."""
    return service_call.with_cloud(ctx, action)


def servers(stub: Any) -> service_call.Kind:
    """Servers by id or name (within the caller's project)."""
    async def lookup(filter_: str) -> list[Any]:
        reply = await stub.ListInstances(R.ListInstancesRequest(filter=filter_, page_size=2))
        return list(reply.instances)
    return service_call.Kind("server", lookup)


async def server_group_id(stub: Any, ref: str) -> str:
    async def lookup(filter_: str) -> list[Any]:
        reply = await stub.ListServerGroups(scheduler_pb2.ListServerGroupsRequest(
            filter=filter_, page_size=2))
        return list(reply.server_groups)
    return await service_call.Kind("server group", lookup).id_of(ref)


def row(instance: instance_pb2.Instance) -> dict[str, Any]:
    """A server as one flat row, states without prefixes, addresses as `net=ip`."""
    return service_call.flat(
        instance, state=server_wait.state_word(instance),
        task_state=server_wait.step_word(instance),
        power_state=Instance.PowerState.Name(instance.power_state)
        .removeprefix("POWER_STATE_").lower(),
        flavor=instance.flavor.name or instance.flavor_id,
        addresses=[f"{a.network_name or a.network_id}={a.ip_address}"
                   for a in instance.addresses],
        fault=server_wait.fault_text(instance))


async def named(c: sdk_cloud.Cloud,
                found: list[instance_pb2.Instance]) -> list[instance_pb2.Instance]:
    """The servers with each address's network name filled in (asked once per network; a
    network the caller cannot read keeps its id)."""
    ids = sorted({a.network_id for i in found for a in i.addresses
                  if a.network_id and not a.network_name})
    if not ids:
        return found
    network = c.network
    names: dict[str, str] = {}
    for network_id in ids:
        with contextlib.suppress(errors.NubisError):
            names[network_id] = (await network.GetNetwork(
                network_pb2.GetNetworkRequest(id=network_id))).meta.name
    for instance in found:
        for address in instance.addresses:
            address.network_name = address.network_name or names.get(address.network_id, "")
    return found


def _show(ctx: typer.Context, instance: instance_pb2.Instance) -> None:
    cli_context.get(ctx).output.record(row(instance), title="server")


def _result(ctx: typer.Context, found: list[instance_pb2.Instance]) -> None:
    if len(found) == 1:
        _show(ctx, found[0])
        return
    cli_context.get(ctx).output.table([row(i) for i in found],
                                      ["id", "name", "state", "task_state", "addresses"])


async def _settle(ctx: typer.Context, c: sdk_cloud.Cloud, started: list[instance_pb2.Instance],
                  wait: bool, within: float,
                  expected: Collection[int] | None) -> list[instance_pb2.Instance]:
    """The servers as the verb left them, or, with --wait, as they settled (checked)."""
    if not wait:
        return await named(c, started)
    done = await server_wait.follow(c.compute, started, cli_context.get(ctx).output,
                                    within=within)
    server_wait.check(done, expected)
    return await named(c, done)


# -- create ---------------------------------------------------------------------


def names_for(name: str, count: int) -> list[str]:
    """`--count K` makes NAME-1..NAME-K; one server keeps NAME."""
    return [name] if count == 1 else [f"{name}-{i}" for i in range(1, count + 1)]


@dataclass
class Shape:
    """What `server create` asks for, as given on the command line (names or ids)."""

    flavor: str
    image: str = ""
    boot_volume: str = ""
    networks: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    server_group: str = ""
    key_name: str = ""
    zone: str = ""
    user_data: bytes = b""

    async def resolve(self, c: sdk_cloud.Cloud) -> instance_pb2.Instance:
        """The Instance to create with every reference made an id (names once, for K)."""
        instance = Instance(flavor_id=await flavor_cli.flavors(c.compute).id_of(self.flavor),
                            key_name=self.key_name, availability_zone=self.zone,
                            user_data=self.user_data, security_groups=self.security_groups)
        if self.image or self.boot_volume or self.volumes:
            storage = c.storage
            instance.image_id = await image_cli.images(storage).id_of(self.image)
            instance.boot_volume_id = await volume_cli.volumes(storage).id_of(self.boot_volume)
            for volume_id in await volume_cli.volumes(storage).ids_of(self.volumes):
                instance.block_devices.add(volume_id=volume_id)
        if self.networks or self.ports:
            network = c.network
            for network_id in await network_cli.networks(network).ids_of(self.networks):
                instance.networks.add(network_id=network_id)
            for port_id in await network_cli.ports(network).ids_of(self.ports):
                instance.networks.add(port_id=port_id)
        if self.server_group:
            instance.server_group_id = await server_group_id(c.scheduler,
                                                             self.server_group)
        return instance


@app.command("create")
def server_create(
    ctx: typer.Context, name: str,
    flavor: Annotated[str, typer.Option("--flavor", help="Flavor (id or name; default: the "
                                        "cloud's, see server_defaults).")] = "",
    image: Annotated[str, typer.Option("--image", help="Image to boot (id or name; default: "
                                       "the cloud's).")] = "",
    boot_volume: Annotated[str, typer.Option("--boot-volume", help="Boot from this volume "
                                             "instead of an image.")] = "",
    network: Annotated[list[str] | None, typer.Option(
        "--network", help="A NIC on this network (repeat; NICs: networks, then ports; "
        "default: the cloud's).")] = None,
    port: Annotated[list[str] | None, typer.Option("--port", help="Plug this existing port "
                                                   "(repeat).")] = None,
    volume: Annotated[list[str] | None, typer.Option("--volume", help="Attach this available "
                                                     "volume at boot (repeat).")] = None,
    security_group: Annotated[list[str] | None, typer.Option(
        "--security-group", help="For the ports made at boot (repeat; default: default).")]
    = None,
    count: Annotated[int, typer.Option("--count", min=1, max=1000,
                                       help="Boot K servers, NAME-1..NAME-K.")] = 1,
    server_group: Annotated[str, typer.Option("--server-group", help="Join this server "
                                              "group (affinity rules).")] = "",
    key_name: Annotated[str, typer.Option("--key-name", help="Key pair to inject.")] = "",
    zone: Annotated[str, typer.Option("--availability-zone")] = "",
    user_data: Annotated[Path | None, typer.Option(
        "--user-data", exists=True, dir_okay=False, help="cloud-init user data file.")] = None,
    wait: Wait = False, timeout: Timeout = 600.0,
) -> None:
    """Boot a server (or --count of them); with --wait, until each is ACTIVE or ERROR."""
    given, picked = server_defaults.complete(cli_context.get(ctx), server_defaults.Given(
        flavor, image, boot_volume, list(network or []), list(port or []),
        list(security_group or [])))
    for line in picked:
        cli_context.get(ctx).output.note(line)
    shape = Shape(flavor=given.flavor, image=given.image, boot_volume=boot_volume,
                  networks=given.networks, ports=given.ports, volumes=list(volume or []),
                  security_groups=given.security_groups,
                  server_group=server_group, key_name=key_name, zone=zone,
                  user_data=user_data.read_bytes() if user_data is not None else b"")

    async def go(c: sdk_cloud.Cloud) -> list[instance_pb2.Instance]:
        template = await shape.resolve(c)
        made: list[instance_pb2.Instance] = []
        for each in names_for(name, count):
            instance = Instance()
            instance.CopyFrom(template)
            instance.meta.name = each
            try:
                # One request_id per server: a retried call returns that server, never a second.
                made.append(await c.compute.CreateInstance(R.CreateInstanceRequest(
                    instance=instance, request_id=service_call.request_id())))
            except errors.NubisError:
                if made:  # say what the error leaves behind before it is printed
                    cli_context.get(ctx).output.note(
                        f"{len(made)} of {count} servers were created before this error: "
                        + ", ".join(server_wait.label(m) for m in made))
                raise
        return await _settle(ctx, c, made, wait, timeout, _ACTIVE)

    _result(ctx, run(ctx, go))


# -- read -----------------------------------------------------------------------


@app.command("list")
def server_list(ctx: typer.Context, all_projects: AllProjects = False,
                filter_: Filter = "") -> None:
    """List your project's servers."""
    async def go(c: sdk_cloud.Cloud) -> list[Any]:
        return await named(c, await network_cli.listing(
            c.compute.ListInstances, R.ListInstancesRequest, "instances",
            all_projects=all_projects, filter=filter_))

    cli_context.get(ctx).output.table(
        [row(i) for i in run(ctx, go)],
        ["id", "name", "state", "task_state", "power_state", "flavor", "addresses", "node"])


@app.command("show")
def server_show(ctx: typer.Context, server: str) -> None:
    """Show one server (id or name)."""
    async def go(c: sdk_cloud.Cloud) -> instance_pb2.Instance:
        found: instance_pb2.Instance = await c.compute.GetInstance(
            R.GetInstanceRequest(id=await servers(c.compute).id_of(server)))
        return (await named(c, [found]))[0]
    _show(ctx, run(ctx, go))


@app.command("console-log")
def server_console_log(
    ctx: typer.Context, server: str,
    lines: Annotated[int, typer.Option("--lines", min=0, help="Only the last N lines "
                                       "(0: all).")] = 0,
) -> None:
    """Print the server's serial console output."""
    async def go(c: sdk_cloud.Cloud) -> V.GetConsoleLogResponse:
        reply: V.GetConsoleLogResponse = await c.compute.GetConsoleLog(V.GetConsoleLogRequest(
            id=await servers(c.compute).id_of(server), tail_lines=lines))
        return reply

    reply = run(ctx, go)
    out = cli_context.get(ctx).output
    if out.json:
        out.emit_json({"output": reply.output, "truncated": reply.truncated})
        return
    out.console.file.write(reply.output if reply.output.endswith("\n") or not reply.output
                           else reply.output + "\n")
    if reply.truncated:
        out.note("(cut to the size limit; --lines N for the end)")


def _action_row(action: instance_action_pb2.InstanceAction) -> dict[str, Any]:
    return service_call.flat(
        action, state=A.InstanceAction.State.Name(action.state),
        events=[f"{e.name}:{A.InstanceAction.State.Name(e.state)}" for e in action.events])


@app.command("action-list")
def server_action_list(ctx: typer.Context, server: str) -> None:
    """The server's actions (operations), newest first, with their steps."""
    async def go(c: sdk_cloud.Cloud) -> list[Any]:
        server_id = await servers(c.compute).id_of(server)
        return await network_cli.listing(c.compute.ListInstanceActions,
                                         A.ListInstanceActionsRequest, "actions",
                                         instance_id=server_id)

    cli_context.get(ctx).output.table(
        [_action_row(a) for a in run(ctx, go)],
        ["id", "action", "state", "create_time", "finish_time", "message", "events"])


@app.command("watch")
def server_watch(
    ctx: typer.Context,
    server: Annotated[str, typer.Argument(help="Only this server (default: all).")] = "",
    all_projects: AllProjects = False, filter_: Filter = "",
    initial: Annotated[bool, typer.Option("--initial/--changes-only",
                                          help="List the servers first.")] = True,
    since: Annotated[int, typer.Option("--since", min=0, help="Resume after this etcd "
                                       "revision.")] = 0,
) -> None:
    """Print every change of your servers as it happens (Ctrl-C to stop)."""
    out = cli_context.get(ctx).output

    async def go(c: sdk_cloud.Cloud) -> None:
        server_id = await servers(c.compute).id_of(server) if server else ""
        stream = c.compute.WatchInstances(R.WatchInstancesRequest(
            options=resource_pb2.WatchOptions(all_projects=all_projects, initial_state=initial,
                                              start_revision=since), filter=filter_),
            deadline=_WATCH_UNTIL_STOPPED)
        async for event in stream:
            if server_id and event.instance.meta.id != server_id:
                continue
            _print_event(out, event)

    run(ctx, go)


def _print_event(out: Any, event: R.InstanceEvent) -> None:
    kind = resource_pb2.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    if out.json:  # one object a line, so a script can read the stream as it comes
        out.console.file.write(json.dumps({"type": kind, "revision": event.revision,
                                           "server": row(event.instance)}, default=str) + "\n")
        out.console.file.flush()
        return
    if event.type == resource_pb2.EVENT_TYPE_SYNCED:
        out.note(f"{event.revision:>8}  SYNCED")
        return
    out.note(f"{event.revision:>8}  {kind:<8}  {server_wait.label(event.instance)}  "
             f"{server_wait.describe(event.instance)}")


# -- lifecycle verbs ---------------------------------------------------------------


def _verb(ctx: typer.Context, server: str, send: Callable[[Any, str], Awaitable[Any]],
          wait: bool, timeout: float, expected: Collection[int] | None) -> None:
    """Resolve the server, send the verb, and show it (as it settled, with --wait)."""
    async def go(c: sdk_cloud.Cloud) -> list[instance_pb2.Instance]:
        server_id = await servers(c.compute).id_of(server)
        return await _settle(ctx, c, [await send(c, server_id)], wait, timeout, expected)

    _result(ctx, run(ctx, go))


@app.command("start")
def server_start(ctx: typer.Context, server: str, wait: Wait = False,
                 timeout: Timeout = 300.0) -> None:
    """Power a STOPPED server on."""
    _verb(ctx, server, lambda c, i: c.compute.StartInstance(V.StartInstanceRequest(id=i)),
          wait, timeout, _ACTIVE)


@app.command("stop")
def server_stop(
    ctx: typer.Context, server: str,
    grace: Annotated[int, typer.Option("--grace", min=0, help="Seconds for a clean guest "
                                       "shutdown before it is forced (0: the service's).")] = 0,
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Power an ACTIVE server off."""
    _verb(ctx, server, lambda c, i: c.compute.StopInstance(
        V.StopInstanceRequest(id=i, timeout_seconds=grace)), wait, timeout,
        frozenset({Instance.STOPPED}))


@app.command("reboot")
def server_reboot(
    ctx: typer.Context, server: str,
    hard: Annotated[bool, typer.Option("--hard", help="Power-cycle instead of asking the "
                                       "guest.")] = False,
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Reboot an ACTIVE server (soft unless --hard)."""
    kind = V.RebootInstanceRequest.REBOOT_TYPE_HARD if hard \
        else V.RebootInstanceRequest.REBOOT_TYPE_SOFT
    _verb(ctx, server, lambda c, i: c.compute.RebootInstance(
        V.RebootInstanceRequest(id=i, type=kind)), wait, timeout, _ACTIVE)


@app.command("delete")
def server_delete(
    ctx: typer.Context,
    server: Annotated[list[str], typer.Argument(help="Servers (ids or names).")],
    force: Annotated[bool, typer.Option("--force", help="Even while an operation is in "
                                        "flight or its node is down (admin).")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Until each is DELETED.")] = False,
    timeout: Timeout = 300.0,
) -> None:
    """Delete servers, from any state: domain, ports, disks and claims go with them."""
    async def go(c: sdk_cloud.Cloud) -> None:
        ids = await servers(c.compute).ids_of(server)
        started = [await c.compute.DeleteInstance(R.DeleteInstanceRequest(id=i, force=force))
                   for i in ids]
        if wait:
            await server_wait.follow(c.compute, started, cli_context.get(ctx).output,
                                     within=timeout)

    run(ctx, go)
    if not wait:
        for ref in server:
            cli_context.get(ctx).output.note(f"server {ref} is being deleted")


@app.command("resize")
def server_resize(
    ctx: typer.Context, server: str,
    flavor: Annotated[str, typer.Option("--flavor", help="New flavor (id or name).")],
    wait: Wait = False, timeout: Timeout = 600.0,
) -> None:
    """Move a server to another flavor; it ends in VERIFY_RESIZE (confirm or revert)."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        flavor_id = await flavor_cli.flavors(c.compute).id_of(flavor)
        return await c.compute.ResizeInstance(V.ResizeInstanceRequest(id=server_id,
                                                                      flavor_id=flavor_id))
    _verb(ctx, server, send, wait, timeout, frozenset({Instance.VERIFY_RESIZE}))


@app.command("resize-confirm")
def server_resize_confirm(ctx: typer.Context, server: str, wait: Wait = False,
                          timeout: Timeout = 300.0) -> None:
    """Keep the new flavor of a server in VERIFY_RESIZE (frees the old claim)."""
    _verb(ctx, server, lambda c, i: c.compute.ConfirmResize(V.ConfirmResizeRequest(id=i)),
          wait, timeout, None)


@app.command("resize-revert")
def server_resize_revert(ctx: typer.Context, server: str, wait: Wait = False,
                         timeout: Timeout = 600.0) -> None:
    """Go back to the old flavor (and node) of a server in VERIFY_RESIZE."""
    _verb(ctx, server, lambda c, i: c.compute.RevertResize(V.RevertResizeRequest(id=i)),
          wait, timeout, None)


@app.command("migrate")
def server_migrate(
    ctx: typer.Context, server: str,
    live: Annotated[bool, typer.Option("--live", help="Without stopping it (both nodes' "
                                       "drivers must support it).")] = False,
    block_migration: Annotated[bool, typer.Option("--block-migration", help="--live: copy "
                                                  "local disks too.")] = False,
    target_node: TargetNode = "", wait: Wait = False, timeout: Timeout = 600.0,
) -> None:
    """Move a server to another node (admin); cold migration ends in VERIFY_RESIZE."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        if live:
            return await c.compute.LiveMigrateInstance(V.LiveMigrateInstanceRequest(
                id=server_id, target_node=target_node, block_migration=block_migration))
        return await c.compute.MigrateInstance(V.MigrateInstanceRequest(
            id=server_id, target_node=target_node))
    _verb(ctx, server, send, wait, timeout,
          _ACTIVE if live else frozenset({Instance.VERIFY_RESIZE}))


@app.command("evacuate")
def server_evacuate(
    ctx: typer.Context, server: str, target_node: TargetNode = "",
    force: Annotated[bool, typer.Option("--force", help="Even if its node's lease has not "
                                        "lapsed (you vouch that it is down).")] = False,
    wait: Wait = False, timeout: Timeout = 600.0,
) -> None:
    """Rebuild a server of a DOWN node on another node (admin)."""
    _verb(ctx, server, lambda c, i: c.compute.EvacuateInstance(V.EvacuateInstanceRequest(
        id=i, target_node=target_node, force=force)), wait, timeout, None)


@app.command("rebuild")
def server_rebuild(
    ctx: typer.Context, server: str,
    image: Annotated[str, typer.Option("--image", help="Image to rebuild from (id or name; "
                                       "default: the server's own).")] = "",
    name: Annotated[str, typer.Option("--name", help="New name of the server.")] = "",
    wait: Wait = False, timeout: Timeout = 600.0,
) -> None:
    """Remake a server's root disk from an image on its node; ports and volumes stay."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        image_id = await image_cli.images(c.storage).id_of(image) if image else ""
        return await c.compute.RebuildInstance(V.RebuildInstanceRequest(
            id=server_id, image_id=image_id, name=name))
    _verb(ctx, server, send, wait, timeout, frozenset({Instance.ACTIVE, Instance.STOPPED}))


# -- hot-plug -------------------------------------------------------------------


@app.command("add-volume")
def server_add_volume(
    ctx: typer.Context, server: str, volume: str,
    device: Annotated[str, typer.Option("--device", help="Guest device, e.g. vdb "
                                        "(default: the next free).")] = "",
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Attach an available volume to a server."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        volume_id = await volume_cli.volumes(c.storage).id_of(volume)
        return await c.compute.AttachVolume(V.AttachVolumeRequest(
            instance_id=server_id, volume_id=volume_id, device_name=device))
    _verb(ctx, server, send, wait, timeout, None)


@app.command("remove-volume")
def server_remove_volume(
    ctx: typer.Context, server: str, volume: str,
    force: Annotated[bool, typer.Option("--force", help="Drop the attachment even if the "
                                        "node cannot unplug it (admin).")] = False,
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Detach a volume from a server (not its root volume)."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        volume_id = await volume_cli.volumes(c.storage).id_of(volume)
        return await c.compute.DetachVolume(V.DetachVolumeRequest(
            instance_id=server_id, volume_id=volume_id, force=force))
    _verb(ctx, server, send, wait, timeout, None)


@app.command("add-port")
def server_add_port(
    ctx: typer.Context, server: str,
    port: Annotated[str, typer.Option("--port", help="Plug this existing port.")] = "",
    network: Annotated[str, typer.Option("--network", help="Or make a port on this "
                                         "network.")] = "",
    fixed_ip: Annotated[str, typer.Option("--fixed-ip", help="--network: this address.")] = "",
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Hot-plug a NIC: an existing port, or a new one on a network."""
    if bool(port) == bool(network):
        raise typer.BadParameter("give --port or --network (exactly one)")

    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        stub = c.network
        nic = (instance_pb2.NetworkRequest(port_id=await network_cli.ports(stub).id_of(port))
               if port else instance_pb2.NetworkRequest(
                   network_id=await network_cli.networks(stub).id_of(network),
                   fixed_ip=fixed_ip))
        return await c.compute.AttachPort(V.AttachPortRequest(instance_id=server_id,
                                                              network=nic))
    _verb(ctx, server, send, wait, timeout, None)


@app.command("remove-port")
def server_remove_port(ctx: typer.Context, server: str, port: str, wait: Wait = False,
                       timeout: Timeout = 300.0) -> None:
    """Hot-unplug a NIC (ports made by compute are deleted, yours are kept)."""
    async def send(c: sdk_cloud.Cloud, server_id: str) -> Any:
        port_id = await network_cli.ports(c.network).id_of(port)
        return await c.compute.DetachPort(V.DetachPortRequest(instance_id=server_id,
                                                              port_id=port_id))
    _verb(ctx, server, send, wait, timeout, None)
