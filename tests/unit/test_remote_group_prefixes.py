"""A remote-group rule admits exactly its group's bound members, in as few prefixes as that.

The rule goes to the node naming its group; the group's member list travels beside it.
"""

from __future__ import annotations

import ipaddress

from nubis.network.v1 import port_pb2, security_group_pb2

from services.network import port_filter

Port = port_pb2.Port
Rule = security_group_pb2.SecurityGroupRule


def _port(number: int, address: str, groups: list[str], node: str = "n1") -> Port:
    port = Port(node=node, security_group_ids=groups, port_security_enabled=True)
    port.meta.id = f"port-{number}"
    port.fixed_ips.add(ip_address=address)
    return port


def _snapshot(ports: list[Port]) -> port_filter.Snapshot:
    group = security_group_pb2.SecurityGroup(rules=[
        Rule(direction=Rule.DIRECTION_INGRESS, ether_type=Rule.ETHER_TYPE_IPV4,
             remote_group_id="g")])
    group.meta.id = "g"
    group.rules[0].meta.id = "r"
    return port_filter.Snapshot(ports, {"g": group})


def test_neighbouring_members_share_prefixes_and_nobody_else_is_admitted() -> None:
    members = [_port(i, f"10.0.0.{i}", ["g"]) for i in range(2, 130) if i != 77]
    outsiders = [_port(77, "10.0.0.77", ["other"]), _port(200, "10.0.0.200", ["g"], node="")]
    seen = _snapshot([*members, *outsiders])
    request = port_filter.request_for(members[0], seen)
    # One rule naming the group, whatever its size; the prefixes are the group's list.
    assert [(rule.remote_group_id, rule.remote_ip_prefix) for rule in request.rules] == [("g", "")]
    (listed,) = request.remote_groups
    assert listed.group_id == "g"
    prefixes = [ipaddress.ip_network(text) for text in listed.addresses]
    assert len(prefixes) <= 14  # 127 members, not 127 prefixes
    admitted = {address for prefix in prefixes for address in prefix}
    assert admitted == {ipaddress.ip_address(f"10.0.0.{i}") for i in range(2, 130) if i != 77}


def test_a_lone_member_is_its_bare_address() -> None:
    seen = _snapshot([_port(1, "10.0.0.9", ["g"])])
    assert [list(group.addresses) for group in port_filter.request_for(
        seen.ports[0], seen).remote_groups] == [["10.0.0.9"]]


def test_each_node_gets_the_lists_its_filters_name_once() -> None:
    ports = [_port(1, "10.0.0.1", ["g"], node="n1"), _port(2, "10.0.0.2", ["g"], node="n1"),
             _port(3, "10.0.0.3", ["g"], node="n2"), _port(4, "10.0.0.4", ["other"], node="n3")]
    seen = port_filter.Snapshot(_snapshot(ports).ports, _snapshot(ports).groups, revision=42)
    lists = port_filter.member_lists(seen, ["g"], skip=["port-3"])
    # n2's only filter was sent whole; n3's names no remote group.
    assert list(lists) == ["n1"]
    assert list(lists["n1"].port_ids) == ["port-1", "port-2"]
    (listed,) = lists["n1"].groups
    assert (listed.group_id, listed.revision) == ("g", 42)
    assert list(listed.addresses) == ["10.0.0.1", "10.0.0.2/31"]  # every bound member
    assert port_filter.member_lists(seen, ["other"]) == {}
