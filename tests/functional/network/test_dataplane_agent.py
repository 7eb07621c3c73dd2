"""The network tasks through a real agent: the recording dataplane on the test driver, the
kernel one when asked for (in a "node" namespace), both reported in the node's facts.

An agent on libvirt's test driver reports dataplane "recording", its tunnel
address and whether it is a network node (the scheduler's GetNode shows
them, and so does `nubis node show`); ensure_network there records the
kernel's commands once (a repeat records nothing), network_state reads them
and the network back, and
remove_network forgets it. A malformed request comes back INVALID_ARGUMENT
naming its fields. The same tasks on an agent set to the kernel dataplane
inside a namespace make the bridge there and remove it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, network_devices, tasks
from services.common.task_sender import TaskSender
from tests.conftest import EtcdEndpoint
from tests.functional import agent_harness
from tests.functional import scheduler_harness as harness
from tests.functional.network import netns
from tests.functional.network.netns import network_request, port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def _send(sender: TaskSender, node: str, spec: tasks.TaskSpec[tasks.Req, tasks.Resp],
                request: tasks.Req) -> tasks.Resp:
    return await sender.send(node, spec, request, operation_id=tasks.new_operation_id())


async def _wait_up(sender: TaskSender, node: str) -> None:
    await sender.send(node, tasks.PING, tasks_pb2.PingRequest(),
                      operation_id=tasks.new_operation_id(), deadline=60)


async def test_the_recording_dataplane_through_an_agent(
        etcd: EtcdEndpoint, key_prefix: str, agents: agent_harness.AgentLauncher,
        sender: TaskSender, tmp_path: Path) -> None:
    node = f"rec-{uuid.uuid4().hex[:6]}"
    agents.start(node, env={"NUBIS_AGENT__TUNNEL_ADDRESS": "192.0.2.10",
                            "NUBIS_AGENT__NETWORK_NODE": "true"})
    replica = await harness.start_replica(harness.settings_for(etcd.endpoint, key_prefix))
    try:
        await harness.wait_for(lambda: _has_node(replica, node), 30)
        shown = await replica.stub.GetNode(scheduler_pb2.GetNodeRequest(name=node))
        assert (shown.dataplane, shown.tunnel_address, shown.network_node,
                shown.port_filter) == ("recording", "192.0.2.10", True, "nftables")
        listed = await replica.stub.ListNodes(scheduler_pb2.ListNodesRequest(
            filter="network_node=true dataplane=recording"))
        assert node in [n.name for n in listed.nodes]
        env = dict(os.environ, NUBIS_SCHEDULER_ADDR=replica.running.address,
                   NUBIS_LAB_DIR=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
        code, out, err = await _nubis(env, "-o", "json", "node", "show", node)
        assert code == 0, err
        assert (json.loads(out)["dataplane"], json.loads(out)["port_filter"]) == (
            "recording", "nftables")
    finally:
        await replica.stop()

    network_id = str(uuid.uuid4())
    request = network_request(network_id, 6001, [port("p1", "fa:16:3e:60:00:01", "subnet-a",
                                                      "10.77.0.5")],
                              peers=["192.0.2.10", "192.0.2.11"])
    made = await _send(sender, node, tasks.ENSURE_NETWORK, request)
    assert (made.dataplane, made.changed, made.dhcp) == ("recording", True, True)
    assert made.bridge == network_devices.bridge(network_id)
    assert made.vxlan == network_devices.vxlan(network_id)
    again = await _send(sender, node, tasks.ENSURE_NETWORK, request)
    assert not again.changed

    state = await _send(sender, node, tasks.NETWORK_STATE, tasks_pb2.NetworkStateRequest())
    assert state.dataplane == "recording"
    assert [n.network_id for n in state.networks] == [network_id]
    realized = state.networks[0]
    assert list(realized.vxlan_peers) == ["192.0.2.11"]
    assert list(realized.dhcp_hosts) == ["fa:16:3e:60:00:01,10.77.0.5,host-10-77-0-5"]
    vxlan = network_devices.vxlan(network_id)
    assert f"bridge fdb append 00:00:00:00:00:00 dev {vxlan} dst 192.0.2.11" in state.actions
    assert len([a for a in state.actions if a.startswith("dnsmasq start")]) == 1

    removed = await _send(sender, node, tasks.REMOVE_NETWORK,
                          tasks_pb2.RemoveNetworkRequest(network_id=network_id))
    assert removed.changed
    removed = await _send(sender, node, tasks.REMOVE_NETWORK,
                          tasks_pb2.RemoveNetworkRequest(network_id=network_id))
    assert not removed.changed
    after = await _send(sender, node, tasks.NETWORK_STATE,
                        tasks_pb2.NetworkStateRequest(network_id=network_id))
    assert list(after.networks) == []

    bad = network_request("not-a-uuid", 0, [port("p1", "FA:16", "subnet-a", "10.9.0.5")])
    with pytest.raises(errors.InvalidArgument) as caught:
        await _send(sender, node, tasks.ENSURE_NETWORK, bad)
    assert {v.field for v in caught.value.violations} == {
        "network_id", "vni", "ports[0].mac_address", "ports[0].fixed_ips[0]"}


async def _nubis(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """The real `nubis` command line, in its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.client.cli", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def _has_node(replica: harness.Replica, name: str) -> bool:
    return replica.cache.view(name) is not None


@pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or "")
async def test_the_kernel_dataplane_through_an_agent(
        agents: agent_harness.AgentLauncher, sender: TaskSender, tmp_path: Path) -> None:
    spaces = netns.Namespaces(tmp_path)
    try:
        node_ns = spaces.make("node")
        node = f"krn-{uuid.uuid4().hex[:6]}"
        agents.start(node, env={"NUBIS_AGENT__DATAPLANE": "kernel",
                                "NUBIS_AGENT__DATAPLANE_NETNS": node_ns,
                                "NUBIS_AGENT__STATE_DIR": str(tmp_path / "agent")})
        await _wait_up(sender, node)
        network_id = str(uuid.uuid4())
        mac = "fa:16:3e:61:00:01"
        made = await _send(sender, node, tasks.ENSURE_NETWORK, network_request(
            network_id, 6002, [port("p1", mac, "subnet-a", "10.77.0.6")]))
        assert (made.dataplane, made.changed) == ("kernel", True)
        guest = spaces.attach_guest(node_ns, made.bridge, "guest", mac)
        assert spaces.dhcp(guest)["ip"] == "10.77.0.6"

        state = await _send(sender, node, tasks.NETWORK_STATE,
                            tasks_pb2.NetworkStateRequest(network_id=network_id))
        assert state.dataplane == "kernel" and state.networks[0].dhcp
        removed = await _send(sender, node, tasks.REMOVE_NETWORK,
                              tasks_pb2.RemoveNetworkRequest(network_id=network_id))
        assert removed.changed
        links = netns.run("ip", "-n", node_ns, "-o", "link", "show").stdout
        assert network_devices.short_id(network_id) not in links
    finally:
        agents.stop_all()
        spaces.remove_all()
