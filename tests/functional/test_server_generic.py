"""A service's methods are served through their generic handler, never a registered one.

grpc's asyncio server keeps one pending request per registered method and
waits on all of them for every call it takes; the bootstrap hands a
service's generated add function a server that keeps only the generic
handlers. The add function here registers a different answer under each
kind: grpc prefers a registered handler, so an answer from it would show the
registration got through.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.client.channel import make_channel
from services.common import server
from services.common.settings import ServiceEndpoint, Settings
from tests.functional import echo_service
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc


def _answering(text: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def echo(request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=text)

    return grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=echo_pb2.EchoRequest.FromString,
        response_serializer=echo_pb2.EchoResponse.SerializeToString)


def _add_both(servicer: object, to: grpc.aio.Server) -> None:
    to.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        echo_service.SERVICE_NAME, {"Echo": _answering("generic")}),))
    to.add_registered_method_handlers(echo_service.SERVICE_NAME,
                                      {"Echo": _answering("registered")})


async def test_methods_are_served_by_their_generic_handler() -> None:
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0),
        [server.Registration(echo_service.SERVICE_NAME, None, _add_both)],
        settings=Settings())
    channel = make_channel(running.address)
    try:
        reply = await echo_pb2_grpc.EchoServiceStub(channel).Echo(
            echo_pb2.EchoRequest(message="hi"))
        assert reply.message == "generic"
    finally:
        await channel.close()
        await running.stop(0)
