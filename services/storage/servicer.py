"""StorageService over gRPC: thin handlers from request to domain call and back.

Policy ran in the auth hook before a handler starts; a handler gets the
caller, calls one domain function and returns its answer. RPCs not written
yet fall through to the generated base and answer UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

from nubis.storage.v1 import storage_service_pb2_grpc

from services.client import peers
from services.common import context
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import TaskSender

Ctx = Any  # grpc.aio.ServicerContext; handlers never touch it


def _caller() -> context.Principal | None:
    """The verified caller; None only when the server runs without authentication."""
    return context.current().principal


class StorageServicer(storage_service_pb2_grpc.StorageServiceServicer):
    """The storage API: one method per RPC, each a call into one domain module."""

    def __init__(self, store: Store, settings: Settings, sender: TaskSender,
                 clients: peers.ServiceClients) -> None:
        self._store = store
        self._settings = settings
        self._sender = sender
        self._clients = clients
