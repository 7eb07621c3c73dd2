"""A real service process on `run_service`: SIGTERM drains and exits 0; its logs keep no secret.

The process (tests/functional/echo_main.py) connects to the session etcd,
serves EchoService with an authenticator, and writes JSON log lines that the
tests read back after it stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.client.channel import make_channel
from services.client.lab import daemons
from tests.conftest import EtcdEndpoint
from tests.functional import serving
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
GRACE = 3.0
# A syntactically real JWT (header.payload.signature, base64url).
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLW9mLWFsaWNl"


@dataclass
class EchoProcess:
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines


def _spawn(etcd: EtcdEndpoint, key_prefix: str, tmp_path: Path, port: int,
           extra: list[str]) -> EchoProcess:
    env = {
        **os.environ,
        "NUBIS_ETCD__ENDPOINTS": json.dumps([etcd.endpoint]),
        "NUBIS_ETCD__PREFIX": key_prefix,
        "NUBIS_SHUTDOWN_GRACE": str(GRACE),
        "NUBIS_LOG_JSON": "true",
        "NUBIS_LOG_LEVEL": "info",
    }
    log_path = tmp_path / "echo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.functional.echo_main", "--port", str(port), *extra],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return EchoProcess(proc, f"127.0.0.1:{port}", log_path)


@pytest.fixture
def echo_process(
    etcd: EtcdEndpoint, key_prefix: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[EchoProcess]:
    """The echo service process; indirect parametrization adds command-line arguments."""
    extra: list[str] = getattr(request, "param", [])
    echo = _spawn(etcd, key_prefix, tmp_path, daemons.free_port(), extra)
    try:
        yield echo
    finally:
        if echo.proc.poll() is None:
            echo.proc.kill()
            echo.proc.wait()


async def _wait_serving(echo: EchoProcess) -> None:
    await serving.wait_serving(echo.address, echo.proc, echo.log_text)


async def _terminate(echo: EchoProcess) -> tuple[int, float]:
    """SIGTERM the process; its exit status and how long it took to exit."""
    started = time.monotonic()
    echo.proc.send_signal(signal.SIGTERM)
    try:
        status = await asyncio.to_thread(echo.proc.wait, GRACE + 2)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {GRACE + 2}s after SIGTERM:\n{echo.log_text()}")
    return status, time.monotonic() - started


async def test_sigterm_drains_and_exits_zero(echo_process: EchoProcess) -> None:
    await _wait_serving(echo_process)
    async with make_channel(echo_process.address, token="any") as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.Echo(echo_pb2.EchoRequest(message="finish me", sleep_seconds=1.0))
        )
        await asyncio.sleep(0.3)
        status, elapsed = await _terminate(echo_process)
        assert (await in_flight).message == "finish me"
    assert status == 0, echo_process.log_text()
    assert elapsed <= GRACE + 2
    events = [line["event"] for line in echo_process.log_lines()]
    assert events.index("serving") < events.index("draining") < events.index("on_stop ran")
    assert events.index("on_stop ran") < events.index("stopped")
    assert "background task failed" not in events  # a finished job is not a failure


@pytest.mark.parametrize("echo_process", [["--fail-background-after", "1.0"]], indirect=True)
async def test_failed_background_task_stops_the_service(echo_process: EchoProcess) -> None:
    # No wait for SERVING here: on a slow machine the job may fail before a probe
    # gets in. The log below shows the service was serving when the job failed.
    try:
        status = await asyncio.to_thread(echo_process.proc.wait, GRACE + 5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still serving after its background task failed:\n{echo_process.log_text()}")
    assert status == 1
    failure = next(
        line for line in echo_process.log_lines() if line["event"] == "background task failed"
    )
    assert "RuntimeError: background job crashed" in failure["exception"]
    events = [line["event"] for line in echo_process.log_lines()]
    assert events.index("serving") < events.index("background task failed")
    assert events.index("background task failed") < events.index("on_stop ran")


async def test_logs_have_access_lines_and_no_token(echo_process: EchoProcess) -> None:
    await _wait_serving(echo_process)
    async with make_channel(echo_process.address, token=JWT) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        metadata = (("x-request-id", "req-log-1"),)
        await stub.Echo(echo_pb2.EchoRequest(message=f"my token is {JWT}"), metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Echo(
                echo_pb2.EchoRequest(message=JWT, fail_with=grpc.StatusCode.INTERNAL.value[0]),
                metadata=(("x-request-id", "req-log-2"),),
            )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
    status, _ = await _terminate(echo_process)
    assert status == 0

    text = echo_process.log_text()
    assert JWT not in text
    assert JWT.split(".")[2] not in text  # not even the signature alone
    lines = echo_process.log_lines()
    access = [line for line in lines if line["event"] == "rpc"]
    ok = next(line for line in access if line["request_id"] == "req-log-1")
    assert ok["method"] == "/nubis.testing.v1.EchoService/Echo"
    assert ok["code"] == "OK"
    assert isinstance(ok["duration_ms"], float)
    assert ok["user_id"] == "bearer-user"
    failed = next(line for line in access if line["request_id"] == "req-log-2")
    assert failed["code"] == "INTERNAL"
    # The handler logged the metadata it got: the authorization entry is blanked.
    echo_line = next(
        line for line in lines if line["event"] == "echo" and line["request_id"] == "req-log-1"
    )
    assert ["authorization", "[redacted]"] in echo_line["metadata"]
    assert echo_line["message"] == "my token is [redacted]"
    # The traceback is in the log (not sent to the client), scrubbed as well.
    crash = next(line for line in lines if line["event"] == "unhandled exception in handler")
    assert crash["request_id"] == "req-log-2"
    assert "RuntimeError: database password leaked: [redacted]" in crash["exception"]


async def test_taken_port_runs_on_stop_and_exits_non_zero(
    etcd: EtcdEndpoint, key_prefix: str, tmp_path: Path,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        echo = _spawn(etcd, key_prefix, tmp_path, port, [])
        try:
            status = await asyncio.to_thread(echo.proc.wait, 30)
        except subprocess.TimeoutExpired:
            echo.proc.kill()
            echo.proc.wait()
            pytest.fail(f"still running on a taken port:\n{echo.log_text()}")
    assert status == 1, echo.log_text()
    assert "Traceback" not in echo.log_text()
    lines = echo.log_lines()
    failure = next(line for line in lines if line["event"] == "cannot start")
    assert failure["level"] == "error" and failure["address"].endswith(f":{port}")
    events = [line["event"] for line in lines]
    assert events.index("cannot start") < events.index("on_stop ran") < events.index("stopped")
