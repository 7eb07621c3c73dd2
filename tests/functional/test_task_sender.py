"""Tasks sent to real agents through the shared sender, from a grpc.aio handler.

A test servicer, served by the nubis server bootstrap, runs `Delay` on a node
through `TaskSender` and answers `Echo` at once. While a slow task is awaited
the handler's event loop keeps serving echoes; a task whose agent is gone ends
at its deadline with UNAVAILABLE naming the node, and the message expires so
an agent starting later does not run it. Domain errors raised on the agent
come back as the same class and reason; a task delivered twice does its work
once.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from nubis.agent.v1 import tasks_pb2

from services.client.channel import CallPolicy, make_channel
from services.common import errors, server, tasks
from services.common.settings import ServiceEndpoint, Settings
from services.common.task_sender import TaskSender
from tests.functional import agent_harness

PROBE = "nubis.testing.v1.TaskProbe"
DELAY = f"/{PROBE}/Delay"
ECHO = f"/{PROBE}/Echo"
Context = grpc.aio.ServicerContext[Any, Any]


class TaskProbe:
    """Delay runs the agent's delay task on the node named in `x-node` metadata."""

    def __init__(self, sender: TaskSender) -> None:
        self._sender = sender

    async def delay(self, request: tasks_pb2.DelayRequest,
                    context: Context) -> tasks_pb2.DelayResponse:
        metadata = dict(context.invocation_metadata() or ())
        deadline = float(metadata["x-deadline"]) if "x-deadline" in metadata else None
        return await self._sender.send(str(metadata["x-node"]), tasks.DELAY, request,
                                       operation_id=tasks.new_operation_id(), deadline=deadline)

    async def echo(self, request: wrappers_pb2.StringValue,
                   context: Context) -> wrappers_pb2.StringValue:
        return request

    def add_to_server(self, _servicer: object, grpc_server: grpc.aio.Server) -> None:
        grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, {
            "Delay": grpc.unary_unary_rpc_method_handler(
                self.delay, request_deserializer=tasks_pb2.DelayRequest.FromString,
                response_serializer=tasks_pb2.DelayResponse.SerializeToString),
            "Echo": grpc.unary_unary_rpc_method_handler(
                self.echo, request_deserializer=wrappers_pb2.StringValue.FromString,
                response_serializer=wrappers_pb2.StringValue.SerializeToString),
        }),))


@pytest.fixture
async def probe(sender: TaskSender) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a nubis gRPC server serving TaskProbe (no client retries)."""
    servicer = TaskProbe(sender)
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0),
        [server.Registration(PROBE, servicer, servicer.add_to_server)],
        settings=Settings(),
    )
    try:
        async with make_channel(running.address, policy=CallPolicy(max_attempts=1)) as channel:
            yield channel
    finally:
        await running.stop(0)


def _delay_call(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(DELAY, request_serializer=tasks_pb2.DelayRequest.SerializeToString,
                               response_deserializer=tasks_pb2.DelayResponse.FromString)


async def _echo_latency(channel: grpc.aio.Channel) -> float:
    echo = channel.unary_unary(ECHO, request_serializer=wrappers_pb2.StringValue.SerializeToString,
                               response_deserializer=wrappers_pb2.StringValue.FromString)
    started = time.perf_counter()
    reply = await echo(wrappers_pb2.StringValue(value="hi"), timeout=10)
    assert reply.value == "hi"
    return time.perf_counter() - started


async def _ping(sender: TaskSender, node: str) -> None:
    reply = await sender.send(node, tasks.PING, tasks_pb2.PingRequest(),
                              operation_id=tasks.new_operation_id(), deadline=30)
    assert reply == tasks_pb2.PingResponse(node=node, status="pong")


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_loop_keeps_serving_while_a_slow_task_is_awaited(
    agents: agent_harness.AgentLauncher, sender: TaskSender, probe: grpc.aio.Channel,
) -> None:
    node = f"slow-{uuid.uuid4().hex[:6]}"
    agents.start(node)
    await _ping(sender, node)
    idle = [await _echo_latency(probe) for _ in range(20)]

    slow = asyncio.ensure_future(_delay_call(probe)(
        tasks_pb2.DelayRequest(seconds=2.0), metadata=(("x-node", node),), timeout=30))
    started = time.monotonic()
    during: list[float] = []
    while not slow.done():
        during.append(await _echo_latency(probe))
        await asyncio.sleep(0.01)
    reply = await slow
    assert reply.node == node and reply.waited_seconds >= 2.0
    assert time.monotonic() - started >= 2.0
    print(f"echo latency idle p50 {statistics.median(idle) * 1000:.1f} ms, while a 2 s task "
          f"was awaited p50 {statistics.median(during) * 1000:.1f} ms, "
          f"max {max(during) * 1000:.1f} ms over {len(during)} calls")
    # A loop blocked on the task would hold every echo for about 2 s.
    assert len(during) >= 20
    assert max(during) < 0.5


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_task_whose_agent_is_gone_ends_at_its_deadline(
    agents: agent_harness.AgentLauncher, sender: TaskSender, probe: grpc.aio.Channel,
) -> None:
    node = f"gone-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _delay_call(probe)(tasks_pb2.DelayRequest(seconds=0),
                                 metadata=(("x-node", node), ("x-deadline", "1.5")), timeout=30)
    elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert node in (caught.value.details() or "")
    assert 1.5 <= elapsed < 5

    # The message expired with its caller's deadline: an agent that starts
    # now drops it, so the first pool check it runs is the one sent next.
    pool = f"late-{uuid.uuid4().hex[:6]}"
    request = tasks_pb2.EnsurePoolRequest(name=pool, path=f"/{pool}")
    with pytest.raises(errors.Unavailable, match=node):
        await sender.send(node, tasks.ENSURE_POOL, request,
                          operation_id=tasks.new_operation_id(), deadline=1.0)
    agents.start(node)
    reply = await sender.send(node, tasks.ENSURE_POOL, request,
                              operation_id=tasks.new_operation_id(), deadline=30)
    assert reply.changed, "the expired task ran on the late agent"


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_domain_errors_and_redelivery(
    agents: agent_harness.AgentLauncher, sender: TaskSender,
) -> None:
    node = f"err-{uuid.uuid4().hex[:6]}"
    agents.start(node)
    await _ping(sender, node)
    op = tasks.new_operation_id()

    with pytest.raises(errors.NotFound) as not_found:
        await sender.send(node, tasks.DOMAIN_STATUS, tasks_pb2.DomainStatusRequest(name="nope"),
                          operation_id=op)
    assert not_found.value.reason == "nubis.agent.libvirt_not_found"
    assert not_found.value.metadata["node"] == node

    with pytest.raises(errors.InvalidArgument) as invalid:
        await sender.send(node, tasks.ENSURE_POOL,
                          tasks_pb2.EnsurePoolRequest(name="../etc", path="relative"),
                          operation_id=op)
    assert {v.field for v in invalid.value.violations} == {"name", "path"}

    status = await sender.send(node, tasks.DOMAIN_STATUS,
                               tasks_pb2.DomainStatusRequest(name="test"), operation_id=op)
    assert status.state == "running"

    # The same operation delivered twice at once (a redelivery racing the
    # original): the lock and the prerequisite check make the work happen once.
    pool = f"twice-{uuid.uuid4().hex[:6]}"
    request = tasks_pb2.EnsurePoolRequest(name=pool, path=f"/{pool}")
    replies = await asyncio.gather(*(
        sender.send(node, tasks.ENSURE_POOL, request, operation_id=op) for _ in range(3)))
    assert sorted(reply.changed for reply in replies) == [False, False, True]
    assert {reply.name for reply in replies} == {pool}


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_background_tasks_wait_behind_the_others_queued_on_the_node(
    agents: agent_harness.AgentLauncher, sender: TaskSender,
) -> None:
    node = f"bg-{uuid.uuid4().hex[:6]}"
    loop = asyncio.get_running_loop()
    done: dict[str, float] = {}

    async def run(label: str, spec: Any, request: Any, *, background: bool) -> None:
        await sender.send(node, spec, request, operation_id=tasks.new_operation_id(),
                          deadline=60, background=background)
        done[label] = loop.time()

    # Queued before the node's agent runs: eight slow background tasks, then one ping.
    slow = [asyncio.ensure_future(run(f"delay-{i}", tasks.DELAY,
                                      tasks_pb2.DelayRequest(seconds=0.5), background=True))
            for i in range(8)]
    await asyncio.sleep(0.5)
    ping = asyncio.ensure_future(run("ping", tasks.PING, tasks_pb2.PingRequest(),
                                     background=False))
    await asyncio.sleep(0.5)
    agents.start(node)
    await asyncio.gather(ping, *slow)
    # Its worker took the ping first, though it was queued last (in order it would have
    # waited for two rounds of its four threads' delays).
    assert done["ping"] < min(at for label, at in done.items() if label != "ping")
