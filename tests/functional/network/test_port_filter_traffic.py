"""A port's nwfilter applied by libvirt to a real bridge port, with traffic through it.

A "node" namespace holds a bridge with two "guest" namespaces on it, and a
private libvirtd runs inside the node (its ebtables and iptables rules stay
there). The port filter task defines the filter of guest 1's port; binding
it to guest 1's bridge port (virNWFilterBindingCreateXML with the task's
`<filterref>`, what libvirt does for a domain interface that carries it)
makes libvirt apply it, so: the allowed port is reached, another is not,
guest 1 talks out from its own address but not from a spoofed one; a rule
change reaches the bound port at once. Runs as root; skips otherwise.
"""

from __future__ import annotations

import subprocess
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import firewall, phases
from services.common import tasks
from tests.functional import libvirtd
from tests.functional.network import netns

pytestmark = [
    pytest.mark.skipif((netns.missing_reason() or libvirtd.missing_reason()) is not None,
                       reason=netns.missing_reason() or libvirtd.missing_reason() or ""),
    pytest.mark.slow, pytest.mark.timeout(120),
]

GUARDED_MAC, GUARDED_IP = "fa:16:3e:50:00:05", "10.60.0.5"
PEER_MAC, PEER_IP = "fa:16:3e:50:00:06", "10.60.0.6"
SPOOFED_IP = "10.60.0.99"

class Lan:
    """A node namespace with a bridge, two guests on it and libvirtd inside."""

    def __init__(self, spaces: netns.Namespaces) -> None:
        self.spaces = spaces
        self.node = spaces.make("fwnode")
        netns.run("ip", "-n", self.node, "link", "add", "br0", "type", "bridge")
        netns.run("ip", "-n", self.node, "link", "set", "br0", "up")
        # Bridged IP traffic passes iptables, where libvirt puts a port's layer-3 rules.
        netns.run("ip", "netns", "exec", self.node, "sysctl", "-qw",
                  "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
        self.guarded = self._guest("guarded", "port1", GUARDED_MAC, GUARDED_IP)
        self.peer = self._guest("peer", "port2", PEER_MAC, PEER_IP)
        self.servers: list[subprocess.Popen[str]] = []

    def _guest(self, role: str, tap: str, mac: str, address: str) -> str:
        guest = self.spaces.make(role)
        self.spaces.link(guest, "eth0", self.node, tap, mac=mac)
        netns.run("ip", "-n", self.node, "link", "set", tap, "master", "br0")
        netns.run("ip", "-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
        return guest

    def serve(self, guest: str, port: int) -> None:
        self.servers.append(netns.echo_server(guest, port))

    def connect(self, guest: str, address: str, port: int, source: str = "") -> str:
        """What a connection from `guest` gets: the address the server saw, or "refused"."""
        return netns.echo(guest, address, port, source)

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


def _ensure(task: firewall.EnsurePortFilter, request: tasks_pb2.EnsurePortFilterRequest,
            locks: phases.Locks) -> tasks_pb2.PortFilter:
    ctx = phases.Context(node="fwnode", operation_id=tasks.new_operation_id(), task_id="t",
                         deadline=time.time() + 30)
    outcome: Any = phases.run(task, ctx, tasks.to_json(request), locks)
    answer: tasks_pb2.PortFilter = tasks.outcome_response(task.spec, outcome, "fwnode")
    return answer


def _bind(conn: libvirt.virConnect, tap: str, mac: str, filterref_xml: str) -> None:
    binding = ElementTree.Element("filterbinding")
    owner = ElementTree.SubElement(binding, "owner")
    ElementTree.SubElement(owner, "name").text = "nubis-test-guest"
    ElementTree.SubElement(owner, "uuid").text = str(uuid.uuid4())
    ElementTree.SubElement(binding, "portdev", name=tap)
    ElementTree.SubElement(binding, "mac", address=mac)
    binding.append(ElementTree.fromstring(filterref_xml))
    conn.nwfilterBindingCreateXML(ElementTree.tostring(binding, encoding="unicode"))


def _rule(port: int) -> tasks_pb2.FilterRule:
    return tasks_pb2.FilterRule(direction="ingress", ethertype="IPv4", protocol="tcp",
                                port_range_min=port, port_range_max=port)


def test_libvirt_applies_the_filter_and_a_rule_change_reaches_the_bound_port(lan: Lan) -> None:
    with libvirtd.private_libvirtd(lan.node) as uri:
        driver = driver_module.Driver(uri)
        conn = libvirt.open(uri)
        try:
            task = firewall.EnsurePortFilter(firewall.NwFilters(driver.filters))
            locks = phases.Locks()
            request = tasks_pb2.EnsurePortFilterRequest(
                port_id=str(uuid.uuid4()), mac_address=GUARDED_MAC, fixed_ips=[GUARDED_IP],
                port_security_enabled=True,
                rules=[_rule(22), tasks_pb2.FilterRule(direction="egress", ethertype="IPv4")])
            answer = _ensure(task, request, locks)
            _bind(conn, "port1", GUARDED_MAC, answer.filterref_xml)
            lan.serve(lan.guarded, 22)
            lan.serve(lan.guarded, 80)
            lan.serve(lan.peer, 8080)

            assert lan.connect(lan.peer, GUARDED_IP, 22) == PEER_IP
            assert lan.connect(lan.peer, GUARDED_IP, 80) == "refused"
            assert lan.connect(lan.guarded, PEER_IP, 8080) == GUARDED_IP
            netns.run("ip", "-n", lan.guarded, "addr", "add", f"{SPOOFED_IP}/24", "dev", "eth0")
            assert lan.connect(lan.guarded, PEER_IP, 8080, source=SPOOFED_IP) == "refused"

            request.rules[0].CopyFrom(_rule(80))
            assert _ensure(task, request, locks).changed

            assert lan.connect(lan.peer, GUARDED_IP, 80) == PEER_IP
            assert lan.connect(lan.peer, GUARDED_IP, 22) == "refused"
            conn.nwfilterBindingLookupByPortDev("port1").delete()
            driver.filters.remove(request.port_id)
        finally:
            conn.close()
            driver.close()
