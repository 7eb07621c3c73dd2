"""`nubis volume|snapshot|pool ...`: block volumes in the nodes' pools, their snapshots,
and the pools as the agents report them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from nubis.common.v1 import resource_pb2
from nubis.storage.v1 import pool_pb2, snapshot_pb2, volume_pb2

from services.client import cli_context
from services.client.commands import image as image_cli
from services.client.commands import service_call
from services.client.commands.image import call
from services.client.sdk import waiters
from services.common import errors

if TYPE_CHECKING:
    from services.client.commands.image import Stub
V, S, P = volume_pb2, snapshot_pb2, pool_pb2

volume_app = typer.Typer(help="Block volumes: blank, from an image or a snapshot.",
                         no_args_is_help=True)
snapshot_app = typer.Typer(help="Snapshots of volumes.", no_args_is_help=True)
pool_app = typer.Typer(help="Storage pools of the nodes.", no_args_is_help=True)

AllProjects = Annotated[bool, typer.Option("--all-projects", help="Every project (admin).")]
Filter = Annotated[str, typer.Option("--filter", help="key=value terms, e.g. 'state=AVAILABLE'.")]
Wait = Annotated[bool, typer.Option("--wait", help="Return once the operation has finished.")]
Timeout = Annotated[float, typer.Option("--timeout", min=1.0,
                                        help="Seconds --wait waits at most.")]


def volumes(stub: Stub) -> service_call.Kind:
    async def lookup(filter_: str) -> list[Any]:
        return list((await stub.ListVolumes(V.ListVolumesRequest(filter=filter_,
                                                                 page_size=2))).volumes)
    return service_call.Kind("volume", lookup)


def snapshots(stub: Stub) -> service_call.Kind:
    async def lookup(filter_: str) -> list[Any]:
        return list((await stub.ListSnapshots(S.ListSnapshotsRequest(filter=filter_,
                                                                     page_size=2))).snapshots)
    return service_call.Kind("snapshot", lookup)


async def pool_id(stub: Stub, ref: str) -> str:
    """A pool's id from its id, `NODE/NAME`, or a name only one node's pool has."""
    node, _, name = ref.rpartition("/")

    async def lookup(filter_: str) -> list[Any]:
        terms = f"{filter_} node={node}" if node else filter_
        return list((await stub.ListStoragePools(P.ListStoragePoolsRequest(
            filter=terms, page_size=2))).storage_pools)
    return await service_call.Kind("storage pool", lookup).id_of(name if node else ref)


def _fault(resource: Any) -> str:
    fault = resource.fault
    return f"{fault.message} ({fault.reason})" if fault.reason or fault.message else ""


def _volume_row(volume: volume_pb2.Volume) -> dict[str, Any]:
    source = volume.WhichOneof("source") or ""
    return service_call.flat(
        volume, state=service_call.state_name(volume), size_gb=volume.size_gb,
        source=f"{source.removeprefix('source_').removesuffix('_id')}:{getattr(volume, source)}"
        if source else "", fault=_fault(volume),
        attached_to=[f"{a.instance_id}:{a.device_name}" if a.device_name else a.instance_id
                     for a in volume.attachments])


def _show_volume(ctx: typer.Context, volume: volume_pb2.Volume) -> None:
    cli_context.get(ctx).output.record(_volume_row(volume), title="volume")


async def _settled(s: Stub, volume_id: str, states: tuple[str, ...],
                   within: float) -> volume_pb2.Volume:
    """The volume once it is in one of `states` with nothing in flight: the SDK's waiter,
    on WatchVolumes; ERROR is an error naming the fault (waiters.ResourceFailed)."""
    done: volume_pb2.Volume = await waiters.wait(waiters.VOLUMES, s, volume_id, states,
                                                 within=within)
    return done


@volume_app.command("create")
def volume_create(
    ctx: typer.Context, name: str,
    size: Annotated[int, typer.Option("--size", min=1, help="Size in GiB.")],
    image: Annotated[str, typer.Option("--image", help="Make it from this image.")] = "",
    snapshot: Annotated[str, typer.Option("--snapshot", help="Make it from this snapshot.")] = "",
    node: Annotated[str, typer.Option("--node", help="Put it on this node (admin).")] = "",
    zone: Annotated[str, typer.Option("--zone", help="Availability zone.")] = "",
    description: Annotated[str, typer.Option("--description")] = "",
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Create a volume; with --wait, return once it is AVAILABLE."""
    if image and snapshot:
        raise typer.BadParameter("give --image or --snapshot, not both")

    async def run(s: Stub) -> volume_pb2.Volume:
        volume = V.Volume(meta=resource_pb2.ResourceMeta(name=name, description=description),
                          size_gb=size, node=node, availability_zone=zone)
        if image:
            volume.source_image_id = await image_cli.images(s).id_of(image)
        if snapshot:
            volume.source_snapshot_id = await snapshots(s).id_of(snapshot)
        created = await s.CreateVolume(V.CreateVolumeRequest(
            volume=volume, request_id=service_call.request_id()))
        if not wait:
            return created
        return await _settled(s, created.meta.id, ("AVAILABLE",), timeout)

    _show_volume(ctx, call(ctx, run))


@volume_app.command("list")
def volume_list(ctx: typer.Context, all_projects: AllProjects = False,
                filter_: Filter = "") -> None:
    """List your project's volumes."""
    async def run(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListVolumes(V.ListVolumesRequest(
                all_projects=all_projects, filter=filter_, page_token=token,
                page_size=service_call.PAGE_SIZE))
            return list(reply.volumes), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table([_volume_row(v) for v in call(ctx, run)],
                                      ["id", "name", "state", "size_gb", "source",
                                       "attached_to", "node"])


@volume_app.command("show")
def volume_show(ctx: typer.Context, volume: str) -> None:
    """Show one volume (id or name)."""
    async def run(s: Stub) -> volume_pb2.Volume:
        return await s.GetVolume(V.GetVolumeRequest(id=await volumes(s).id_of(volume)))
    _show_volume(ctx, call(ctx, run))


@volume_app.command("extend")
def volume_extend(
    ctx: typer.Context, volume: str,
    size: Annotated[int, typer.Option("--size", min=1, help="New size in GiB (larger).")],
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Grow a volume."""
    async def run(s: Stub) -> volume_pb2.Volume:
        volume_id = await volumes(s).id_of(volume)
        grown = await s.ExtendVolume(V.ExtendVolumeRequest(id=volume_id, new_size_gb=size))
        if not wait:
            return grown
        # An attached volume grows in place and stays IN_USE.
        return await _settled(s, volume_id, ("AVAILABLE", "IN_USE"), timeout)
    _show_volume(ctx, call(ctx, run))


@volume_app.command("delete")
def volume_delete(
    ctx: typer.Context, volume: str,
    force: Annotated[bool, typer.Option("--force", help="Whatever its state (admin).")] = False,
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Delete a volume (refused while attached or while it has snapshots)."""
    async def run(s: Stub) -> None:
        volume_id = await volumes(s).id_of(volume)
        await s.DeleteVolume(V.DeleteVolumeRequest(id=volume_id, force=force))
        if wait:
            await _settled(s, volume_id, ("DELETED",), timeout)
    call(ctx, run)
    cli_context.get(ctx).output.note(f"volume {volume} deleted" if wait
                                     else f"volume {volume} is being deleted")


# -- snapshots -------------------------------------------------------------------


def _snapshot_row(snapshot: snapshot_pb2.Snapshot) -> dict[str, Any]:
    return service_call.flat(snapshot, state=service_call.state_name(snapshot),
                             size_gb=snapshot.size_gb, fault=_fault(snapshot))


def _show_snapshot(ctx: typer.Context, snapshot: snapshot_pb2.Snapshot) -> None:
    cli_context.get(ctx).output.record(_snapshot_row(snapshot), title="snapshot")


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context, name: str,
    volume: Annotated[str, typer.Option("--volume", help="Volume to snapshot.")],
    force: Annotated[bool, typer.Option("--force", help="Even if it is in use "
                                        "(crash-consistent).")] = False,
    description: Annotated[str, typer.Option("--description")] = "",
    wait: Wait = False, timeout: Timeout = 300.0,
) -> None:
    """Snapshot a volume; with --wait, return once it is AVAILABLE."""
    async def run(s: Stub) -> snapshot_pb2.Snapshot:
        snapshot = S.Snapshot(meta=resource_pb2.ResourceMeta(name=name, description=description),
                              volume_id=await volumes(s).id_of(volume))
        created = await s.CreateSnapshot(S.CreateSnapshotRequest(
            snapshot=snapshot, request_id=service_call.request_id(), force=force))
        if not wait:
            return created
        # Polled: snapshots have no Watch RPC, so no SDK waiter either.
        done = await service_call.wait_for(
            lambda: s.GetSnapshot(S.GetSnapshotRequest(id=created.meta.id)),
            lambda x: x.state != S.Snapshot.CREATING, within=timeout,
            what=f"creating snapshot {created.meta.id}")
        if done.state == S.Snapshot.ERROR:
            raise errors.FailedPrecondition(f"snapshot {done.meta.id} went to ERROR: "
                                            f"{_fault(done)}", reason="nubis.cli.operation_failed")
        return done
    _show_snapshot(ctx, call(ctx, run))


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context, all_projects: AllProjects = False,
                  filter_: Filter = "") -> None:
    """List your project's snapshots."""
    async def run(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListSnapshots(S.ListSnapshotsRequest(
                all_projects=all_projects, filter=filter_, page_token=token,
                page_size=service_call.PAGE_SIZE))
            return list(reply.snapshots), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table([_snapshot_row(x) for x in call(ctx, run)],
                                      ["id", "name", "state", "size_gb", "volume_id"])


@snapshot_app.command("show")
def snapshot_show(ctx: typer.Context, snapshot: str) -> None:
    """Show one snapshot (id or name)."""
    async def run(s: Stub) -> snapshot_pb2.Snapshot:
        return await s.GetSnapshot(S.GetSnapshotRequest(id=await snapshots(s).id_of(snapshot)))
    _show_snapshot(ctx, call(ctx, run))


@snapshot_app.command("delete")
def snapshot_delete(ctx: typer.Context, snapshot: str, wait: Wait = False,
                    timeout: Timeout = 300.0) -> None:
    """Delete a snapshot (refused while volumes made from it depend on it)."""
    async def run(s: Stub) -> None:
        snapshot_id = await snapshots(s).id_of(snapshot)
        await s.DeleteSnapshot(S.DeleteSnapshotRequest(id=snapshot_id))
        if wait:  # polled, as snapshot create's wait
            await service_call.wait_gone(
                lambda: s.GetSnapshot(S.GetSnapshotRequest(id=snapshot_id)), within=timeout,
                what=f"deleting snapshot {snapshot_id}",
                failed=lambda x: f"snapshot {snapshot_id} went to ERROR: {_fault(x)}"
                if x.state == S.Snapshot.ERROR else None)
    call(ctx, run)
    cli_context.get(ctx).output.note(f"snapshot {snapshot} deleted" if wait
                                     else f"snapshot {snapshot} is being deleted")


# -- pools -----------------------------------------------------------------------


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f}"


def _pool_row(pool: pool_pb2.StoragePool) -> dict[str, Any]:
    return service_call.flat(
        pool, state=service_call.state_name(pool), capacity_gib=_gib(pool.capacity_bytes),
        allocation_gib=_gib(pool.allocation_bytes), available_gib=_gib(pool.available_bytes))


@pool_app.command("list")
def pool_list(
    ctx: typer.Context,
    node: Annotated[str, typer.Option("--node", help="Only this node's pools.")] = "",
    filter_: Filter = "",
) -> None:
    """List every node's storage pools, with what libvirt reports of them."""
    terms = " ".join(t for t in (filter_, f"node={node}" if node else "") if t)

    async def run(s: Stub) -> list[Any]:
        async def page(token: str) -> tuple[list[Any], str]:
            reply = await s.ListStoragePools(P.ListStoragePoolsRequest(
                filter=terms, page_token=token, page_size=service_call.PAGE_SIZE))
            return list(reply.storage_pools), reply.next_page_token
        return await service_call.every_page(page)

    cli_context.get(ctx).output.table(
        [_pool_row(p) for p in call(ctx, run)],
        ["id", "name", "node", "state", "path", "capacity_gib", "allocation_gib",
         "available_gib"])


@pool_app.command("show")
def pool_show(ctx: typer.Context, pool: str) -> None:
    """Show one pool: its id, NODE/NAME, or a name only one node's pool has."""
    async def run(s: Stub) -> pool_pb2.StoragePool:
        return await s.GetStoragePool(P.GetStoragePoolRequest(id=await pool_id(s, pool)))
    cli_context.get(ctx).output.record(_pool_row(call(ctx, run)), title="storage pool")
