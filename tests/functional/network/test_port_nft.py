"""A port's nftables filter loaded by the agent's task into a real bridge, with traffic through it.

A "node" namespace holds a bridge with two "guest" namespaces on it, their
bridge ends named as nubis names a port's tap. The port filter task (backed
by the kernel dataplane's `KernelPortFilters` in the node namespace) loads the
guarded port's chains before any traffic, so: the allowed TCP port is reached
over IPv4 and IPv6 and another is not, replies of the guarded guest's own
connections come back although no ingress rule admits them, it cannot send
from an address, a MAC or an ARP claim nubis did not give it; a rule change
reaches it at once, a repeat loads nothing, and removing the filter (or port
security off) lets everything through. Runs as root; skips otherwise.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import port_nft
from services.agent.tasks import firewall, phases
from services.common import network_devices, tasks
from tests.functional.network import netns

pytestmark = [
    pytest.mark.skipif(netns.missing_reason() is not None, reason=netns.missing_reason() or ""),
    pytest.mark.slow, pytest.mark.timeout(120),
]

GUARDED_MAC, GUARDED_IP, GUARDED_IP6 = "fa:16:3e:51:00:05", "10.61.0.5", "fd61::5"
PEER_MAC, PEER_IP, PEER_IP6 = "fa:16:3e:51:00:06", "10.61.0.6", "fd61::6"
SPOOFED_IP, SPOOFED_MAC = "10.61.0.99", "fa:16:3e:51:00:99"

class Lan:
    """A node namespace with a bridge and two guests on it, each on a tap named as nubis does."""

    def __init__(self, spaces: netns.Namespaces) -> None:
        self.spaces = spaces
        self.node = spaces.make("nftnode")
        netns.run("ip", "-n", self.node, "link", "add", "br0", "type", "bridge")
        netns.run("ip", "-n", self.node, "link", "set", "br0", "up")
        self.guarded_port, self.peer_port = str(uuid.uuid4()), str(uuid.uuid4())
        self.guarded = self._guest("guarded", self.guarded_port, GUARDED_MAC, GUARDED_IP,
                                   GUARDED_IP6)
        self.peer = self._guest("peer", self.peer_port, PEER_MAC, PEER_IP, PEER_IP6)
        self.servers: list[subprocess.Popen[str]] = []

    def _guest(self, role: str, port_id: str, mac: str, address: str, address6: str) -> str:
        guest = self.spaces.make(role)
        tap = network_devices.tap(port_id)
        self.spaces.link(guest, "eth0", self.node, tap, mac=mac)
        netns.run("ip", "-n", self.node, "link", "set", tap, "master", "br0")
        netns.run("ip", "-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
        netns.run("ip", "-n", guest, "addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
        return guest

    def serve(self, guest: str, port: int, family: int = 4) -> None:
        self.servers.append(netns.echo_server(guest, port, family))

    def connect(self, guest: str, address: str, port: int, source: str = "") -> str:
        """What a connection from `guest` gets: the address the server saw, or "refused"."""
        return netns.echo(guest, address, port, source)

    def forget_neighbours(self) -> None:
        for guest in (self.guarded, self.peer):
            netns.run("ip", "-n", guest, "neigh", "flush", "dev", "eth0")

    def stop(self) -> None:
        netns.stop_echo_servers(self.servers)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    spaces = netns.Namespaces(tmp_path)
    try:
        made = Lan(spaces)
        try:
            yield made
        finally:
            made.stop()
    finally:
        spaces.remove_all()


class Agent:
    """The firewall tasks of one node whose bridges live in `namespace`."""

    def __init__(self, namespace: str) -> None:
        self.ports = port_nft.KernelPortFilters(namespace)
        filters = firewall.NftablesFilters(self.ports)
        self.ensure_task = firewall.EnsurePortFilter(filters)
        self.members_task = firewall.EnsureGroupMembers(filters)
        self.remove_task = firewall.RemovePortFilter(filters)
        self.locks = phases.Locks()

    def call(self, task: phases.AgentTask[Any, Any], request: Any) -> Any:
        ctx = phases.Context(node="nftnode", operation_id=tasks.new_operation_id(),
                             task_id="t", deadline=time.time() + 30)
        outcome = phases.run(task, ctx, tasks.to_json(request), self.locks)
        return tasks.outcome_response(task.spec, outcome, "nftnode")

    def ensure(self, request: tasks_pb2.EnsurePortFilterRequest) -> tasks_pb2.PortFilter:
        answer: tasks_pb2.PortFilter = self.call(self.ensure_task, request)
        return answer

    def remove(self, port_id: str) -> bool:
        answer = self.call(self.remove_task, tasks_pb2.RemovePortFilterRequest(port_id=port_id))
        return bool(answer.changed)


def _tcp_in(port: int, ethertype: str = "IPv4") -> tasks_pb2.FilterRule:
    return tasks_pb2.FilterRule(direction="ingress", ethertype=ethertype, protocol="tcp",
                                port_range_min=port, port_range_max=port)


def _guarded(lan: Lan, rules: list[tasks_pb2.FilterRule],
             security: bool = True) -> tasks_pb2.EnsurePortFilterRequest:
    return tasks_pb2.EnsurePortFilterRequest(
        port_id=lan.guarded_port, mac_address=GUARDED_MAC, fixed_ips=[GUARDED_IP, GUARDED_IP6],
        port_security_enabled=security, rules=rules)


def test_the_filter_admits_what_the_rules_allow_and_a_change_reaches_the_port(lan: Lan) -> None:
    agent = Agent(lan.node)
    request = _guarded(lan, [_tcp_in(22), _tcp_in(22, "IPv6"),
                             tasks_pb2.FilterRule(direction="egress", ethertype="IPv4")])
    answer = agent.ensure(request)
    assert answer.changed and not answer.recorded and answer.backend == "nftables"
    assert answer.filterref_xml == ""
    # What the kernel holds, listed back: the same chains, the rules nft printed.
    held = agent.ports.get(lan.guarded_port)
    assert held.names == tuple(answer.filter_names) and "tcp dport 22 accept" in held.text
    for server in ((lan.guarded, 22, 4), (lan.guarded, 80, 4), (lan.guarded, 2222, 6),
                   (lan.peer, 8080, 4)):
        lan.serve(*server)

    assert lan.connect(lan.peer, GUARDED_IP, 22) == PEER_IP
    assert lan.connect(lan.peer, GUARDED_IP, 80) == "refused"
    # The guarded guest's own connection: its replies come back, though no rule admits them.
    assert lan.connect(lan.guarded, PEER_IP, 8080) == GUARDED_IP
    # IPv6 is filtered too: port 2222 is closed; egress over IPv6 has no rule at all.
    assert lan.connect(lan.peer, GUARDED_IP6, 2222) == "refused"

    assert not agent.ensure(request).changed
    request.rules.append(_tcp_in(80))
    request.rules.append(_tcp_in(2222, "IPv6"))
    request.rules.remove(request.rules[0])
    assert agent.ensure(request).changed
    assert lan.connect(lan.peer, GUARDED_IP, 80) == PEER_IP
    assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"
    assert lan.connect(lan.peer, GUARDED_IP6, 2222) == PEER_IP6

    assert agent.remove(lan.guarded_port)
    assert not agent.remove(lan.guarded_port)
    assert lan.connect(lan.peer, GUARDED_IP, 22) == PEER_IP
    assert agent.ports.port_ids() == []


def test_the_port_cannot_send_from_an_address_a_mac_or_an_arp_claim_it_was_not_given(
        lan: Lan) -> None:
    agent = Agent(lan.node)
    egress = tasks_pb2.FilterRule(direction="egress", ethertype="IPv4")
    agent.ensure(_guarded(lan, [egress]))
    lan.serve(lan.peer, 8080)
    assert lan.connect(lan.guarded, PEER_IP, 8080) == GUARDED_IP

    netns.run("ip", "-n", lan.guarded, "addr", "add", f"{SPOOFED_IP}/24", "dev", "eth0")
    assert lan.connect(lan.guarded, PEER_IP, 8080, source=SPOOFED_IP) == "refused"

    # A claim over ARP of an address it was not given does not reach the neighbour.
    lan.forget_neighbours()
    netns.run("ip", "netns", "exec", lan.guarded, "busybox", "arping", "-c", "2", "-w", "2",
              "-I", "eth0", "-s", SPOOFED_IP, PEER_IP, check=False)
    neighbours = netns.run("ip", "-n", lan.peer, "neigh", "show", SPOOFED_IP).stdout
    assert GUARDED_MAC not in neighbours

    netns.run("ip", "-n", lan.guarded, "link", "set", "eth0", "address", SPOOFED_MAC)
    lan.forget_neighbours()
    assert lan.connect(lan.guarded, PEER_IP, 8080) == "refused"

    # With port security off the filter lets everything through, the new MAC included.
    assert agent.ensure(_guarded(lan, [], security=False)).changed
    assert lan.connect(lan.guarded, PEER_IP, 8080, source=SPOOFED_IP) == SPOOFED_IP
    assert agent.remove(lan.guarded_port)


def test_a_remote_group_admits_the_members_the_node_was_last_given(lan: Lan) -> None:
    """The guarded port admits SSH from the group "peers"; who is in it reaches the kernel as
    member lists, the newest revision kept, with no new filter sent for the port: the
    group's set changes, the port's chains do not."""
    agent = Agent(lan.node)
    group = str(uuid.uuid4())
    ssh = tasks_pb2.FilterRule(direction="ingress", ethertype="IPv4", protocol="tcp",
                               port_range_min=22, port_range_max=22, remote_group_id=group)
    request = _guarded(lan, [ssh])
    request.remote_groups.add(group_id=group, addresses=["10.61.0.200"], revision=10)
    agent.ensure(request)
    lan.serve(lan.guarded, 22)
    assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"  # not a member yet
    members_set = port_nft.group_set(group, 4)
    first = agent.ports.get(lan.guarded_port).text
    assert f"ip saddr @{members_set} tcp dport 22 accept" in first
    assert "elements = { 10.61.0.200 }" in first

    def members(revision: int, *addresses: str) -> tasks_pb2.EnsureGroupMembersResponse:
        answer: tasks_pb2.EnsureGroupMembersResponse = agent.call(
            agent.members_task, tasks_pb2.EnsureGroupMembersRequest(
                groups=[tasks_pb2.GroupMembers(group_id=group, addresses=addresses,
                                               revision=revision)],
                port_ids=[lan.guarded_port]))
        return answer

    joined = members(12, "10.61.0.200", "10.61.0.4/31")  # .4 and .5: the peer is not in it
    assert list(joined.refiltered_port_ids) == [lan.guarded_port]
    assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"
    joined = members(14, "10.61.0.200", PEER_IP)
    assert list(joined.changed_group_ids) == [group] and not joined.missing_port_ids
    assert lan.connect(lan.peer, GUARDED_IP, 22) == PEER_IP
    now = agent.ports.get(lan.guarded_port).text
    assert PEER_IP in now and _chains_of(now) == _chains_of(first)
    # A list of an older listing (a refresh overtaken by a newer bind) changes nothing.
    stale = members(13, "10.61.0.200")
    assert not stale.changed_group_ids and not stale.refiltered_port_ids
    assert lan.connect(lan.peer, GUARDED_IP, 22) == PEER_IP
    left = members(15, "10.61.0.200")
    assert list(left.refiltered_port_ids) == [lan.guarded_port]
    assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"
    # The port's own filter sent again with an older list keeps the newer one too.
    request.remote_groups[0].CopyFrom(tasks_pb2.GroupMembers(
        group_id=group, addresses=["10.61.0.200", PEER_IP], revision=11))
    assert not agent.ensure(request).changed
    assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"

    # A restarted agent knows no filter: it names the port missing, for a whole filter.
    restarted = Agent(lan.node)
    answer = restarted.call(restarted.members_task, tasks_pb2.EnsureGroupMembersRequest(
        groups=[tasks_pb2.GroupMembers(group_id=group, addresses=[PEER_IP], revision=16)],
        port_ids=[lan.guarded_port]))
    assert list(answer.missing_port_ids) == [lan.guarded_port]
    assert agent.remove(lan.guarded_port)
    # The set went with the last filter that named it.
    table = subprocess.run(["ip", "netns", "exec", lan.node, "nft", "list", "table", "bridge",
                            port_nft.TABLE], capture_output=True, text=True, check=True).stdout
    assert members_set not in table


def _chains_of(text: str) -> str:
    """A filter's text without the sets its chains name."""
    return text[text.index("\tchain "):]


def test_every_kind_of_rule_loads_and_a_filter_of_each_reads_back(tmp_path: Path) -> None:
    """Each protocol, port range, ICMP type/code, remote prefix and family the API takes
    becomes nft the kernel accepts, and the loaded chains read back in full."""
    spaces = netns.Namespaces(tmp_path)
    try:
        node = spaces.make("nftkinds")
        rules = [tasks_pb2.FilterRule(direction=direction, ethertype=ethertype, protocol=protocol,
                                      port_range_min=low, port_range_max=high,
                                      remote_ip_prefix=remote)
                 for direction in ("ingress", "egress")
                 for ethertype, remote in (("IPv4", "192.0.2.0/24"), ("IPv6", "2001:db8::/64"),
                                           ("IPv4", ""))
                 for protocol, low, high in (
                     ("tcp", 22, 22), ("udp", 1000, 2000), ("sctp", 0, 0), ("udplite", 0, 0),
                     ("esp", 0, 0), ("ah", 0, 0), ("icmp", 8, 0), ("icmp", 3, -1),
                     ("icmp", -1, -1), ("", 0, 0), ("igmp" if ethertype == "IPv4" else "58", 0, 0))]
        request = tasks_pb2.EnsurePortFilterRequest(
            port_id=str(uuid.uuid4()), mac_address="fa:16:3e:51:00:42",
            fixed_ips=["10.61.0.42", "fd61::42"], port_security_enabled=True, rules=rules,
            allowed_address_pairs=[tasks_pb2.FilterAddressPair(ip_address="10.62.0.0/24",
                                                               mac_address="fa:16:3e:51:00:43")])
        agent = Agent(node)
        answer = agent.ensure(request)
        assert answer.changed
        shown = answer.filter_xml
        assert shown.count("\tchain port-") == 5
        assert "sctp" in shown and "esp" in shown and "udplite" in shown and "igmp" in shown
        assert "ip6 saddr 2001:db8::/64" in shown and "ip daddr 192.0.2.0/24" in shown
        assert "fa:16:3e:51:00:43" in shown and "10.62.0.0/24" in shown
        assert agent.ports.port_ids() == [request.port_id]
        assert not agent.ensure(request).changed
        assert agent.remove(request.port_id)
    finally:
        spaces.remove_all()
