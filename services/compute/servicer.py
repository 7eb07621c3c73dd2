"""ComputeService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. An RPC not built
yet raises NotImplementedError, which the server answers UNIMPLEMENTED
(reason ``nubis.unimplemented``); each is replaced by a call into its module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from nubis.compute.v1 import (
    compute_service_pb2_grpc,
    flavor_pb2,
    instance_action_pb2,
    instance_pb2,
    instance_requests_pb2,
    instance_verbs_pb2,
    keypair_pb2,
)

from services.client import peers
from services.common import context, errors
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender
from services.compute import (
    action,
    admission,
    flavor,
    hotplug,
    instance,
    instance_batch,
    keypair,
    lifecycle,
    migration,
    operation,
    rebuild,
    resize,
    teardown,
    watch,
)

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


def _principal() -> context.Principal:
    """The caller of a call that acts in a project (it needs one)."""
    caller = _caller()
    if caller is None:
        raise errors.Unauthenticated("this call needs a token")
    return caller


class ComputeServicer(compute_service_pb2_grpc.ComputeServiceServicer):
    """The compute API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients, runner: operation.Runner) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients
        self._runner = runner
        self._creates = instance_batch.Batcher(runner)

    # --- flavors ---

    async def GetFlavor(self, request: flavor_pb2.GetFlavorRequest,
                       ctx: Ctx) -> flavor_pb2.Flavor:
        return await flavor.get(self._store, _caller(), request.id)

    async def ListFlavors(self, request: flavor_pb2.ListFlavorsRequest,
                         ctx: Ctx) -> flavor_pb2.ListFlavorsResponse:
        found, token = await flavor.list_flavors(self._store, _caller(), request)
        return flavor_pb2.ListFlavorsResponse(flavors=found, next_page_token=token)

    async def CreateFlavor(self, request: flavor_pb2.CreateFlavorRequest,
                          ctx: Ctx) -> flavor_pb2.Flavor:
        return await flavor.create(self._store, _caller(), request)

    async def UpdateFlavor(self, request: flavor_pb2.UpdateFlavorRequest,
                          ctx: Ctx) -> flavor_pb2.Flavor:
        return await flavor.update(self._store, _caller(), request)

    async def DeleteFlavor(self, request: flavor_pb2.DeleteFlavorRequest,
                          ctx: Ctx) -> flavor_pb2.DeleteFlavorResponse:
        await flavor.delete(self._store, _caller(), request.id, request.revision)
        return flavor_pb2.DeleteFlavorResponse()

    async def AddFlavorAccess(self, request: flavor_pb2.FlavorAccessRequest,
                             ctx: Ctx) -> flavor_pb2.Flavor:
        return await flavor.change_access(self._store, _caller(), request, add=True)

    async def RemoveFlavorAccess(self, request: flavor_pb2.FlavorAccessRequest,
                                ctx: Ctx) -> flavor_pb2.Flavor:
        return await flavor.change_access(self._store, _caller(), request, add=False)

    # --- key pairs ---

    async def GetKeyPair(self, request: keypair_pb2.GetKeyPairRequest,
                        ctx: Ctx) -> keypair_pb2.KeyPair:
        return await keypair.get(self._store, _caller(), request.id)

    async def ListKeyPairs(self, request: keypair_pb2.ListKeyPairsRequest,
                          ctx: Ctx) -> keypair_pb2.ListKeyPairsResponse:
        found, token = await keypair.list_keypairs(self._store, _caller(), request)
        return keypair_pb2.ListKeyPairsResponse(key_pairs=found, next_page_token=token)

    async def CreateKeyPair(self, request: keypair_pb2.CreateKeyPairRequest,
                           ctx: Ctx) -> keypair_pb2.CreateKeyPairResponse:
        return await keypair.create(self._store, _caller(), request)

    async def UpdateKeyPair(self, request: keypair_pb2.UpdateKeyPairRequest,
                           ctx: Ctx) -> keypair_pb2.KeyPair:
        return await keypair.update(self._store, _caller(), request)

    async def DeleteKeyPair(self, request: keypair_pb2.DeleteKeyPairRequest,
                           ctx: Ctx) -> keypair_pb2.DeleteKeyPairResponse:
        await keypair.delete(self._store, _caller(), request.id, request.revision)
        return keypair_pb2.DeleteKeyPairResponse()

    # --- instances: standard methods ---

    async def GetInstance(self, request: instance_requests_pb2.GetInstanceRequest,
                         ctx: Ctx) -> instance_pb2.Instance:
        return instance.shown_versioned(
            await instance.visible(self._store, _caller(), request.id), _caller())

    async def ListInstances(self, request: instance_requests_pb2.ListInstancesRequest,
                           ctx: Ctx) -> instance_requests_pb2.ListInstancesResponse:
        found, token = await instance.list_instances(self._store, _caller(), request)
        return instance_requests_pb2.ListInstancesResponse(instances=found, next_page_token=token)

    async def CreateInstance(self, request: instance_requests_pb2.CreateInstanceRequest,
                            ctx: Ctx) -> instance_pb2.Instance:
        caller = _principal()
        record = await admission.admit(self._store, self._clients, caller, request)
        return await self._creates.create(caller, request, record)

    async def UpdateInstance(self, request: instance_requests_pb2.UpdateInstanceRequest,
                            ctx: Ctx) -> instance_pb2.Instance:
        return await instance.update(self._store, _caller(), request)

    async def DeleteInstance(self, request: instance_requests_pb2.DeleteInstanceRequest,
                            ctx: Ctx) -> instance_pb2.Instance:
        return await teardown.delete(self._runner, _principal(), request)

    async def WatchInstances(self, request: instance_requests_pb2.WatchInstancesRequest,
                            ctx: Ctx) -> AsyncIterator[instance_requests_pb2.InstanceEvent]:
        async for event in watch.watch(self._store, _principal(), request):
            yield event

    # --- instances: lifecycle verbs ---

    async def StartInstance(self, request: instance_verbs_pb2.StartInstanceRequest,
                           ctx: Ctx) -> instance_pb2.Instance:
        return await lifecycle.start(self._runner, _principal(), request)

    async def StopInstance(self, request: instance_verbs_pb2.StopInstanceRequest,
                          ctx: Ctx) -> instance_pb2.Instance:
        return await lifecycle.stop(self._runner, _principal(), request)

    async def RebootInstance(self, request: instance_verbs_pb2.RebootInstanceRequest,
                            ctx: Ctx) -> instance_pb2.Instance:
        return await lifecycle.reboot(self._runner, _principal(), request)

    async def ResizeInstance(self, request: instance_verbs_pb2.ResizeInstanceRequest,
                            ctx: Ctx) -> instance_pb2.Instance:
        return await resize.resize(self._runner, _principal(), request)

    async def ConfirmResize(self, request: instance_verbs_pb2.ConfirmResizeRequest,
                           ctx: Ctx) -> instance_pb2.Instance:
        return await resize.confirm(self._runner, _principal(), request)

    async def RevertResize(self, request: instance_verbs_pb2.RevertResizeRequest,
                          ctx: Ctx) -> instance_pb2.Instance:
        return await resize.revert(self._runner, _principal(), request)

    async def MigrateInstance(self, request: instance_verbs_pb2.MigrateInstanceRequest,
                             ctx: Ctx) -> instance_pb2.Instance:
        return await migration.migrate(self._runner, _principal(), request)

    async def LiveMigrateInstance(self, request: instance_verbs_pb2.LiveMigrateInstanceRequest,
                                 ctx: Ctx) -> instance_pb2.Instance:
        return await migration.live_migrate(self._runner, _principal(), request)

    async def EvacuateInstance(self, request: instance_verbs_pb2.EvacuateInstanceRequest,
                              ctx: Ctx) -> instance_pb2.Instance:
        return await migration.evacuate(self._runner, _principal(), request)

    async def RebuildInstance(self, request: instance_verbs_pb2.RebuildInstanceRequest,
                              ctx: Ctx) -> instance_pb2.Instance:
        return await rebuild.rebuild(self._runner, _principal(), request)

    async def ResetInstanceState(self, request: instance_verbs_pb2.ResetInstanceStateRequest,
                                ctx: Ctx) -> instance_pb2.Instance:
        return await lifecycle.reset_state(self._store, _principal(), request)

    async def GetConsoleLog(self, request: instance_verbs_pb2.GetConsoleLogRequest,
                           ctx: Ctx) -> instance_verbs_pb2.GetConsoleLogResponse:
        return await lifecycle.console_log(self._store, self._sender, _principal(), request)

    # --- instances: hot-plug ---

    async def AttachVolume(self, request: instance_verbs_pb2.AttachVolumeRequest,
                          ctx: Ctx) -> instance_pb2.Instance:
        return await hotplug.attach_volume(self._runner, _principal(), request)

    async def DetachVolume(self, request: instance_verbs_pb2.DetachVolumeRequest,
                          ctx: Ctx) -> instance_pb2.Instance:
        return await hotplug.detach_volume(self._runner, _principal(), request)

    async def AttachPort(self, request: instance_verbs_pb2.AttachPortRequest,
                        ctx: Ctx) -> instance_pb2.Instance:
        return await hotplug.attach_port(self._runner, _principal(), request)

    async def DetachPort(self, request: instance_verbs_pb2.DetachPortRequest,
                        ctx: Ctx) -> instance_pb2.Instance:
        return await hotplug.detach_port(self._runner, _principal(), request)

    # --- instance actions ---

    async def ListInstanceActions(self, request: instance_action_pb2.ListInstanceActionsRequest,
                                 ctx: Ctx) -> instance_action_pb2.ListInstanceActionsResponse:
        found = await instance.visible(self._store, _caller(), request.instance_id)
        page, token = await action.list_actions(self._store, _caller(), found.value.meta.project_id,
                                                request)
        return instance_action_pb2.ListInstanceActionsResponse(actions=page, next_page_token=token)

    async def GetInstanceAction(self, request: instance_action_pb2.GetInstanceActionRequest,
                               ctx: Ctx) -> instance_action_pb2.InstanceAction:
        found = await instance.visible(self._store, _caller(), request.instance_id)
        return await action.get_action(self._store, _caller(), found.value.meta.project_id,
                                       request)
