"""How a service-to-service RPC is declared: its deadline and whether a retry is safe.

A typed client is a `ServiceClient` subclass naming the service, with one
`Rpc` per method::

    class SchedulerClient(ServiceClient):
        NAME = "scheduler"
        SERVICE = "nubis.scheduler.v1.SchedulerService"
        GetNode = Rpc(scheduler_pb2.GetNodeRequest, scheduler_pb2.Node,
                      timeout=5.0, idempotent=True)

and `await clients.scheduler.GetNode(request)` returns a `Node` or raises the
callee's domain error. Every call declares its timeout there (STYLE.md): the
deadline of the whole call, retries included. A call is retried on
UNAVAILABLE only when it is declared idempotent or its request carries a
`request_id` (the callee then answers a repeat with the first outcome).

A server-streaming RPC is a `ServerStream`::

    DownloadImage = ServerStream(image_pb2.DownloadImageRequest,
                                 image_pb2.DownloadImageResponse, timeout=540.0)

and `async for part in clients.storage.DownloadImage(request)` yields its
messages. Its timeout is the deadline of the whole stream. Opening it (until
the first message) is retried like a unary call of its kind; once a message
has arrived a failure is raised to the caller, never retried mid-stream (the
caller knows what it already has, e.g. resumes a download at an offset).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar, overload

from google.protobuf.message import Message

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class Invoker(Protocol):
    """What runs a declared call (services.client.peers.caller.Caller)."""

    async def call(self, rpc: Rpc[Req, Resp], request: Req, deadline: float | None) -> Resp: ...

    def stream(self, rpc: ServerStream[Req, Resp], request: Req,
               deadline: float | None) -> AsyncIterator[Resp]: ...


class ServiceClient:
    """Base of the typed client of one service: its catalog name and its full gRPC name."""

    NAME: ClassVar[str]
    """Short name in the catalog (identity, scheduler, compute, storage, network)."""
    SERVICE: ClassVar[str]
    """Full gRPC service name, e.g. nubis.scheduler.v1.SchedulerService."""

    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker


class Rpc(Generic[Req, Resp]):
    """One unary RPC of a service client; see the module docstring."""

    def __init__(self, request: type[Req], response: type[Resp], *, timeout: float,
                 idempotent: bool = False, authenticated: bool = True) -> None:
        self.request = request
        self.response = response
        self.timeout = timeout
        """Seconds the whole call may take, every retry and backoff included."""
        self.idempotent = idempotent
        """True when running it twice is the same as once (reads, claims keyed by consumer)."""
        self.authenticated = authenticated
        """False for the public calls that need no token (Authenticate)."""
        self.name = ""
        self.service = ""
        self.path = ""

    def __set_name__(self, owner: type[ServiceClient], name: str) -> None:
        self.name = name
        self.service = owner.NAME
        self.path = f"/{owner.SERVICE}/{name}"

    def retryable(self, request: Req) -> bool:
        """May a call that answered UNAVAILABLE be sent again?"""
        if self.idempotent:
            return True
        carries = "request_id" in request.DESCRIPTOR.fields_by_name
        return carries and bool(request.request_id)  # type: ignore[attr-defined]

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> Rpc[Req, Resp]: ...

    @overload
    def __get__(self, instance: ServiceClient, owner: type[Any]) -> BoundRpc[Req, Resp]: ...

    def __get__(self, instance: ServiceClient | None,
                owner: type[Any]) -> Rpc[Req, Resp] | BoundRpc[Req, Resp]:
        if instance is None:
            return self
        return BoundRpc(self, instance._invoker)


class BoundRpc(Generic[Req, Resp]):
    """A declared RPC of one client: await it with a request."""

    def __init__(self, rpc: Rpc[Req, Resp], invoker: Invoker) -> None:
        self.rpc = rpc
        self._invoker = invoker

    async def __call__(self, request: Req, *, deadline: float | None = None) -> Resp:
        """Run the call; `deadline` (seconds) overrides the declared timeout (e.g. with
        what is left of the caller's own deadline)."""
        return await self._invoker.call(self.rpc, request, deadline)


class ServerStream(Rpc[Req, Resp]):
    """One server-streaming RPC of a service client; see the module docstring.

    `deserializer` reads each message instead of protobuf's parser (e.g. image
    chunks as views of the bytes received: services.client.image_stream).
    """

    def __init__(self, request: type[Req], response: type[Resp], *, timeout: float,
                 idempotent: bool = False, authenticated: bool = True,
                 deserializer: Callable[[bytes], Resp] | None = None) -> None:
        super().__init__(request, response, timeout=timeout, idempotent=idempotent,
                         authenticated=authenticated)
        self.deserialize: Callable[[bytes], Resp] = deserializer or response.FromString

    @overload  # type: ignore[override]
    def __get__(self, instance: None, owner: type[Any]) -> ServerStream[Req, Resp]: ...

    @overload
    def __get__(self, instance: ServiceClient, owner: type[Any]) -> BoundStream[Req, Resp]: ...

    def __get__(self, instance: ServiceClient | None,
                owner: type[Any]) -> ServerStream[Req, Resp] | BoundStream[Req, Resp]:
        if instance is None:
            return self
        return BoundStream(self, instance._invoker)


class BoundStream(Generic[Req, Resp]):
    """A declared server-streaming RPC of one client: iterate it with a request."""

    def __init__(self, rpc: ServerStream[Req, Resp], invoker: Invoker) -> None:
        self.rpc = rpc
        self._invoker = invoker

    def __call__(self, request: Req, *, deadline: float | None = None) -> AsyncIterator[Resp]:
        """The stream's messages; `deadline` (seconds, the whole stream) overrides the
        declared timeout."""
        return self._invoker.stream(self.rpc, request, deadline)
