"""Security groups as libvirt nwfilters (`agent.port_filter: nwfilter`), through the agent's
port filter tasks.

The filter tasks run through the agent's phases against a real libvirtd
(a private one: the test driver has no nwfilter driver), and the test reads
libvirt back over its own connection: the port's filter is defined there with
the rules its groups sent, the interface fragment compute puts in the domain
references it, a rule change redefines it in place, port security off leaves
an empty filter, and a removed port leaves no filter. On the test driver the
same tasks keep the filters in memory and say so.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest
from google.protobuf.message import Message
from nubis.agent.v1 import tasks_pb2

from services.agent import driver as driver_module
from services.agent.tasks import firewall, phases
from services.common import errors, network_devices, tasks
from tests.functional import libvirtd

MAC = "fa:16:3e:40:00:05"


@pytest.fixture(scope="module")
def libvirt_uri() -> Iterator[str]:
    reason = libvirtd.missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with libvirtd.private_libvirtd() as uri:
        yield uri


@pytest.fixture
def driver(libvirt_uri: str) -> Iterator[driver_module.Driver]:
    made = driver_module.Driver(libvirt_uri)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def conn(libvirt_uri: str) -> Iterator[libvirt.virConnect]:
    opened = libvirt.open(libvirt_uri)
    try:
        yield opened
    finally:
        opened.close()


class Agent:
    """The port filter tasks of one node, run through the agent's phases."""

    def __init__(self, driver: driver_module.Driver) -> None:
        self.locks = phases.Locks()
        self.ports: list[str] = []
        """Ports whose filters the test made, removed at its end."""
        filters = firewall.NwFilters(driver.filters)
        self.ensure_task = firewall.EnsurePortFilter(filters)
        self.members_task = firewall.EnsureGroupMembers(filters)
        self.remove_task = firewall.RemovePortFilter(filters)
        self.state_task = firewall.PortFilterState(filters)

    def call(self, task: phases.AgentTask[Any, Any], request: Message) -> Any:
        ctx = phases.Context(node="node-1", operation_id=tasks.new_operation_id(),
                             task_id="t", deadline=time.time() + 30)
        outcome = phases.run(task, ctx, tasks.to_json(request), self.locks)
        return tasks.outcome_response(task.spec, outcome, "node-1")

    def ensure(self, request: tasks_pb2.EnsurePortFilterRequest) -> tasks_pb2.PortFilter:
        answer: tasks_pb2.PortFilter = self.call(self.ensure_task, request)
        return answer

    def remove(self, port_id: str) -> tasks_pb2.RemovePortFilterResponse:
        answer: tasks_pb2.RemovePortFilterResponse = self.call(
            self.remove_task, tasks_pb2.RemovePortFilterRequest(port_id=port_id))
        return answer

    def state(self, port_id: str) -> tasks_pb2.PortFilter:
        answer: tasks_pb2.PortFilter = self.call(
            self.state_task, tasks_pb2.PortFilterStateRequest(port_id=port_id))
        return answer


@pytest.fixture
def agent(driver: driver_module.Driver) -> Iterator[Agent]:
    made = Agent(driver)
    try:
        yield made
    finally:
        for port_id in made.ports:
            made.remove(port_id)


def _request(agent: Agent, rules: list[tasks_pb2.FilterRule],
             port_security: bool = True) -> tasks_pb2.EnsurePortFilterRequest:
    port_id = str(uuid.uuid4())
    agent.ports.append(port_id)
    return tasks_pb2.EnsurePortFilterRequest(
        port_id=port_id, mac_address=MAC, fixed_ips=["10.0.0.5"],
        allowed_address_pairs=[tasks_pb2.FilterAddressPair(ip_address="10.0.0.128/25",
                                                           mac_address="fa:16:3e:40:00:99")],
        port_security_enabled=port_security, rules=rules,
        network_id="5d1e7a9c-0000-4000-8000-000000000001", mtu=1450,
        security_group_ids=["group-a"])


SSH_FROM_ADMINS = tasks_pb2.FilterRule(rule_id="r1", direction="ingress", ethertype="IPv4",
                                       protocol="tcp", port_range_min=22, port_range_max=22,
                                       remote_ip_prefix="192.0.2.0/24")
ALL_EGRESS = tasks_pb2.FilterRule(rule_id="r2", direction="egress", ethertype="IPv4")
WEB_FROM_MEMBER = tasks_pb2.FilterRule(rule_id="r3", direction="ingress", ethertype="IPv4",
                                       protocol="tcp", port_range_min=80, port_range_max=443,
                                       remote_ip_prefix="10.0.0.7")


def _defined(conn: libvirt.virConnect, name: str) -> ElementTree.Element:
    return ElementTree.fromstring(conn.nwfilterLookupByName(name).XMLDesc(0))


def _accepted(root: ElementTree.Element) -> list[tuple[str, str, dict[str, str]]]:
    """The root filter's security group rules: (direction, protocol element, attributes)."""
    return [(rule.attrib["direction"], child.tag, dict(child.attrib))
            for rule in root.findall("rule")
            if rule.attrib["action"] == "accept" and rule.attrib["priority"] == "500"
            for child in rule]


def test_a_ports_filter_is_defined_in_libvirt_and_referenced_by_its_interface(
        agent: Agent, conn: libvirt.virConnect) -> None:
    request = _request(agent, [SSH_FROM_ADMINS, ALL_EGRESS])

    answer = agent.ensure(request)

    name = f"nubis-port-{request.port_id}"
    assert answer.filter_name == name and answer.changed and not answer.recorded
    root = _defined(conn, name)
    assert _accepted(root) == [
        ("in", "tcp", {"srcipaddr": "192.0.2.0", "srcipmask": "24", "dstportstart": "22",
                       "dstportend": "22"}),
        ("out", "all", {}),
    ]
    # Anti-spoofing: the port's own chains, with its MAC, address and allowed pair.
    assert [ref.attrib["filter"] for ref in root.findall("filterref")] == [
        f"{name}-mac", f"{name}-ipv4", f"{name}-ipv6", f"{name}-arp"]
    mac_chain = _defined(conn, f"{name}-mac")
    assert {m.attrib["srcmacaddr"] for m in mac_chain.iter("mac")} == {MAC, "fa:16:3e:40:00:99"}
    ip_chain = _defined(conn, f"{name}-ipv4")
    assert {(ip.attrib.get("srcmacaddr"), ip.attrib["srcipaddr"], ip.attrib.get("srcipmask"))
            for ip in ip_chain.iter("ip")} == {
        (None, "0.0.0.0", None),  # a DHCP request
        (MAC, "10.0.0.5", "32"), ("fa:16:3e:40:00:99", "10.0.0.128", "25")}
    # The interface compute puts in the domain references exactly that filter.
    interface = ElementTree.fromstring(answer.interface_xml)
    assert interface.attrib["type"] == "bridge"
    assert interface.find("mac").attrib["address"] == MAC  # type: ignore[union-attr]
    assert interface.find("source").attrib["bridge"] == network_devices.bridge(  # type: ignore[union-attr]
        request.network_id)
    assert interface.find("target").attrib["dev"] == network_devices.tap(  # type: ignore[union-attr]
        request.port_id)
    assert interface.find("filterref").attrib["filter"] == name  # type: ignore[union-attr]
    assert ElementTree.fromstring(answer.filterref_xml).attrib["filter"] == name
    assert sorted(answer.filter_names) == sorted(conn.listNWFilters())


def test_a_rule_change_updates_the_defined_filter_in_place(
        agent: Agent, conn: libvirt.virConnect) -> None:
    request = _request(agent, [SSH_FROM_ADMINS, ALL_EGRESS])
    first = agent.ensure(request)
    filter_uuid = conn.nwfilterLookupByName(first.filter_name).UUIDString()
    assert not agent.ensure(request).changed

    del request.rules[0]
    request.rules.append(WEB_FROM_MEMBER)
    changed = agent.ensure(request)

    assert changed.changed
    root = _defined(conn, first.filter_name)
    assert _accepted(root) == [
        ("out", "all", {}),
        ("in", "tcp", {"srcipaddr": "10.0.0.7", "srcipmask": "32", "dstportstart": "80",
                       "dstportend": "443"}),
    ]
    assert conn.nwfilterLookupByName(first.filter_name).UUIDString() == filter_uuid
    assert agent.state(request.port_id).filter_xml == changed.filter_xml
    assert not agent.ensure(request).changed


def test_port_security_off_leaves_an_empty_filter_and_removal_leaves_none(
        agent: Agent, conn: libvirt.virConnect) -> None:
    request = _request(agent, [SSH_FROM_ADMINS])
    name = agent.ensure(request).filter_name
    request.port_security_enabled = False

    opened = agent.ensure(request)

    assert opened.changed and list(opened.filter_names) == [name]
    root = _defined(conn, name)
    assert root.findall("rule") == [] and root.findall("filterref") == []
    assert agent.remove(request.port_id).changed
    assert [n for n in conn.listNWFilters() if request.port_id in n] == []
    assert not agent.remove(request.port_id).changed
    with pytest.raises(errors.NotFound):
        agent.state(request.port_id)


def test_a_remote_group_rule_is_redefined_in_libvirt_when_its_members_change(
        agent: Agent, conn: libvirt.virConnect) -> None:
    group = str(uuid.uuid4())
    web = tasks_pb2.FilterRule(rule_id="r4", direction="ingress", ethertype="IPv4",
                               protocol="tcp", port_range_min=80, port_range_max=80,
                               remote_group_id=group)
    request = _request(agent, [web])
    request.remote_groups.add(group_id=group, addresses=["10.0.0.7"], revision=3)
    name = agent.ensure(request).filter_name
    assert _accepted(_defined(conn, name)) == [
        ("in", "tcp", {"srcipaddr": "10.0.0.7", "srcipmask": "32", "dstportstart": "80",
                       "dstportend": "80"})]

    answer = agent.call(agent.members_task, tasks_pb2.EnsureGroupMembersRequest(
        groups=[tasks_pb2.GroupMembers(group_id=group, addresses=["10.0.0.8/31"], revision=4)],
        port_ids=[request.port_id, str(uuid.uuid4())]))

    assert list(answer.refiltered_port_ids) == [request.port_id]
    assert len(answer.missing_port_ids) == 1
    assert _accepted(_defined(conn, name)) == [
        ("in", "tcp", {"srcipaddr": "10.0.0.8", "srcipmask": "31", "dstportstart": "80",
                       "dstportend": "80"})]
    # With no members the rule admits nobody.
    agent.call(agent.members_task, tasks_pb2.EnsureGroupMembersRequest(
        groups=[tasks_pb2.GroupMembers(group_id=group, revision=5)]))
    assert _accepted(_defined(conn, name)) == []


def test_bad_rules_are_refused_naming_the_field(agent: Agent) -> None:
    request = _request(agent, [
        tasks_pb2.FilterRule(direction="ingress", protocol="bogus"),
        tasks_pb2.FilterRule(direction="ingress", protocol="tcp", port_range_min=70000),
        tasks_pb2.FilterRule(direction="sideways"),
        tasks_pb2.FilterRule(direction="egress", ethertype="IPv6", remote_ip_prefix="10.0.0.0/8"),
        tasks_pb2.FilterRule(direction="ingress", remote_group_id="web"),
        tasks_pb2.FilterRule(direction="ingress", remote_group_id=str(uuid.uuid4()),
                             remote_ip_prefix="10.0.0.0/8"),
    ])
    request.remote_groups.add(group_id="web", addresses=["10.0.0.300"], revision=-1)

    with pytest.raises(errors.InvalidArgument) as refused:
        agent.ensure(request)

    assert {v.field for v in refused.value.violations} == {
        "rules[0].protocol", "rules[1].port_range_min", "rules[2].direction",
        "rules[3].remote_ip_prefix", "rules[4].remote_group_id", "rules[5].remote_group_id",
        "remote_groups[0].group_id", "remote_groups[0].revision",
        "remote_groups[0].addresses[0]"}
    with pytest.raises(errors.InvalidArgument) as members:
        agent.call(agent.members_task, tasks_pb2.EnsureGroupMembersRequest(
            groups=[tasks_pb2.GroupMembers(group_id=str(uuid.uuid4()), addresses=["nope"])],
            port_ids=["port-1"]))
    assert {v.field for v in members.value.violations} == {"groups[0].addresses[0]",
                                                            "port_ids[0]"}


def test_on_the_test_driver_filters_are_recorded_and_read_back() -> None:
    made = driver_module.Driver("test:///default")
    try:
        agent = Agent(made)
        request = tasks_pb2.EnsurePortFilterRequest(
            port_id=str(uuid.uuid4()), mac_address=MAC, fixed_ips=["10.0.0.5"],
            port_security_enabled=True, rules=[SSH_FROM_ADMINS])

        answer = agent.ensure(request)

        assert answer.recorded and answer.changed
        assert agent.state(request.port_id).filter_xml == answer.filter_xml
        assert not agent.ensure(request).changed
        assert agent.remove(request.port_id).changed
    finally:
        made.close()
