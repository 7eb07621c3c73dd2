"""A remote-group rule admits exactly its group's bound members, in as few prefixes as that."""

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
    rules = port_filter.request_for(members[0], seen).rules
    prefixes = [ipaddress.ip_network(rule.remote_ip_prefix) for rule in rules]
    assert len(prefixes) <= 14  # 127 members, not 127 rules
    admitted = {address for prefix in prefixes for address in prefix}
    assert admitted == {ipaddress.ip_address(f"10.0.0.{i}") for i in range(2, 130) if i != 77}


def test_a_lone_member_is_its_bare_address() -> None:
    seen = _snapshot([_port(1, "10.0.0.9", ["g"])])
    assert [rule.remote_ip_prefix for rule in port_filter.request_for(
        seen.ports[0], seen).rules] == ["10.0.0.9"]
