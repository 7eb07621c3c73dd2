"""CLI errors: a failed RPC from a real server becomes one `error: CODE: message (reason)` line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

import grpc
import pytest
import typer

from services.client import cli, rpc_errors
from services.client.channel import make_channel
from services.client.output import Output, OutputFormat
from services.client.peers import caller, token
from services.client.peers.rpc import Rpc, ServiceClient
from services.client.peers.settings import ClientSettings
from services.common import server
from services.common.settings import ServiceEndpoint, Settings
from tests.functional import echo_service
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc


@pytest.fixture
async def echo_address() -> AsyncIterator[str]:
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0), [echo_service.registration()],
        settings=Settings(),
    )
    yield running.address
    await running.stop(0)


async def _failure(address: str, code: grpc.StatusCode, message: str) -> grpc.aio.AioRpcError:
    async with make_channel(address) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(echo_pb2.EchoRequest(message=message, fail_with=code.value[0]))
    return caught.value


async def test_not_found_is_code_message_and_reason(echo_address: str) -> None:
    error = await _failure(echo_address, grpc.StatusCode.NOT_FOUND, "1234")
    assert rpc_errors.describe_rpc_error(error) == (
        "NOT_FOUND: echo '1234' not found (nubis.not_found)"
    )


async def test_field_violations_are_listed(echo_address: str) -> None:
    error = await _failure(echo_address, grpc.StatusCode.INVALID_ARGUMENT, "HI")
    assert rpc_errors.describe_rpc_error(error) == (
        "INVALID_ARGUMENT: invalid echo [message: must not be shouted; repeat: must be small]"
        " (nubis.invalid_argument)"
    )


async def test_unreachable_server_has_no_reason() -> None:
    async with make_channel("127.0.0.1:1") as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=2)
    assert rpc_errors.describe_rpc_error(caught.value).startswith(
        ("UNAVAILABLE: ", "DEADLINE_EXCEEDED: "))


def _echo_app(address: str) -> typer.Typer:
    """A one-command app standing in for any area's command that calls a service."""
    app = typer.Typer()

    @app.command()
    def echo(message: str, fail_with: int = 0) -> None:
        async def call() -> str:
            async with make_channel(address) as channel:
                stub = echo_pb2_grpc.EchoServiceStub(channel)
                reply = await stub.Echo(echo_pb2.EchoRequest(message=message,
                                                             fail_with=fail_with))
                return str(reply.message)

        Output().record({"message": asyncio.run(call())})

    @app.command()
    def other() -> None:
        """Present so that `echo` stays a sub-command."""

    return app


async def test_cli_prints_one_line_and_exits_1(echo_address: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    app = _echo_app(echo_address)
    code = await asyncio.to_thread(
        cli.run, app, ["echo", "1234", "--fail-with", str(grpc.StatusCode.NOT_FOUND.value[0])])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err == "error: NOT_FOUND: echo '1234' not found (nubis.not_found)\n"
    assert "Traceback" not in captured.out + captured.err


class EchoClient(ServiceClient):
    NAME = "echo"
    SERVICE = echo_service.SERVICE_NAME

    Echo = Rpc(echo_pb2.EchoRequest, echo_pb2.EchoResponse, timeout=5.0)


def _sdk_echo_app(address: str) -> typer.Typer:
    """A command calling through the SDK's caller, as every nubis command does."""
    app = typer.Typer()

    @app.callback()
    def options(output: Annotated[str, typer.Option("-o")] = "table",
                debug: Annotated[bool, typer.Option("--debug")] = False) -> None:
        """The global options cli.run reads for errors."""

    @app.command()
    def echo(message: str, fail_with: int = 0) -> None:
        async def call() -> str:
            # identity is never asked: echo's address is pinned, and the token given.
            runner = caller.Caller(ClientSettings(identity_address="127.0.0.1:1",
                                                  credential=None, endpoints={"echo": address}),
                                   token=token.StaticToken(""))
            try:
                reply = await EchoClient(runner).Echo(echo_pb2.EchoRequest(
                    message=message, fail_with=fail_with))
            finally:
                await runner.close()
            return str(reply.message)

        Output().record({"message": asyncio.run(call())})

    @app.command()
    def other() -> None:
        """Present so that `echo` stays a sub-command."""

    return app


async def test_an_sdk_error_prints_as_the_failed_call(echo_address: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    app = _sdk_echo_app(echo_address)
    invalid = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    code = await asyncio.to_thread(cli.run, app, ["echo", "HI", "--fail-with", invalid])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert captured.err == (
        "error: INVALID_ARGUMENT: invalid echo [message: must not be shouted; repeat: must be "
        "small] (nubis.invalid_argument)\n")
    code = await asyncio.to_thread(cli.run, app, ["echo", "HI", "--fail-with", invalid,
                                                  "--debug"])
    captured = capsys.readouterr()
    assert code == 1 and "grpc code: INVALID_ARGUMENT" in captured.err
    code = await asyncio.to_thread(cli.run, app, ["-o", "json", "echo", "HI", "--fail-with",
                                                  invalid])
    captured = capsys.readouterr()
    error = json.loads(captured.err)["error"]
    assert code == 1 and error["code"] == "INVALID_ARGUMENT"
    assert error["field_violations"][0] == {"field": "message",
                                            "description": "must not be shouted"}


async def test_cli_success_exits_0(echo_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(cli.run, _echo_app(echo_address), ["echo", "hello"])
    assert code == 0
    assert "hello" in capsys.readouterr().out


def test_json_output_is_plain_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output(format=OutputFormat.JSON)
    out.table([{"name": "a", "pid": 1}], ["name", "pid"])
    out.note("for people only")
    captured = capsys.readouterr()
    assert captured.out == '[\n  {\n    "name": "a",\n    "pid": 1\n  }\n]\n'
    assert "for people only" in captured.err
