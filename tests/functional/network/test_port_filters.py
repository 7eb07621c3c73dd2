"""Security group rules reach the filter of every bound port, on every node.

Ports are bound to two agents on libvirt's test driver, whose recording
dataplane keeps each port's nftables chains in memory and reads them back the
same way a kernel node does (``network.port_filter_state``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import network_pb2, port_pb2, security_group_pb2, subnet_pb2

from services.agent.dataplane import port_nft
from services.common import errors, tasks
from tests.functional.network.harness import NetCloud, eventually

P = security_group_pb2
Rule = P.SecurityGroupRule
NODES = (f"e-f1-{uuid.uuid4().hex[:4]}", f"e-f2-{uuid.uuid4().hex[:4]}")


def meta(name: str) -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(name=name)


@pytest.fixture(scope="module")
async def nodes(cloud: NetCloud) -> tuple[str, ...]:
    for name in NODES:
        await cloud.start_agent(name)
    return NODES


async def filter_of(cloud: NetCloud, node: str, port_id: str) -> tasks_pb2.PortFilter | None:
    try:
        return await cloud.ask(node, tasks.PORT_FILTER_STATE,
                               tasks_pb2.PortFilterStateRequest(port_id=port_id))
    except errors.NotFound:
        return None


def admits(found: tasks_pb2.PortFilter | None, address: str, match: str = "") -> bool:
    """Whether the port's ingress chain accepts traffic from `address` (a member's): a rule
    ``ip saddr PEER[ match] accept`` whose peer, a prefix or a set of prefixes (a remote
    group's: its members' addresses merged), holds it."""
    if found is None:
        return False
    wanted = ipaddress.ip_address(address)
    tail = f" {match} accept" if match else " accept"
    for line in ingress(found).splitlines():
        _, saddr, rest = line.strip().partition("ip saddr ")
        peer, _, after = rest.partition(" ")
        if not saddr or f" {after}" != tail:
            continue
        prefixes = set_elements(found, peer[1:]) if peer.startswith("@") else [peer]
        if any(wanted in ipaddress.ip_network(prefix, strict=False) for prefix in prefixes):
            return True
    return False


def set_elements(found: tasks_pb2.PortFilter, name: str) -> list[str]:
    """The elements of a set the filter's chains name, as the filter's text holds it."""
    start = found.filter_xml.index(f"\tset {name} {{\n")
    block = found.filter_xml[start:].split("\n\t}", 1)[0]
    _, listed, rest = block.partition("elements = {")
    return [item.strip() for item in rest.split("}", 1)[0].split(",")] if listed else []


def ingress(found: tasks_pb2.PortFilter) -> str:
    """The port's ingress chain, as the filter's text holds it."""
    chain = f"chain {port_nft.chain(found.port_id, 'in')} {{"
    start = found.filter_xml.index(chain)
    # A chain ends at the first line that is only its closing brace.
    return found.filter_xml[start:].split("\n\t}", 1)[0]


async def bound_port(cloud: NetCloud, network_id: str, name: str, node: str,
                     groups: list[str]) -> port_pb2.Port:
    made = await cloud.api().CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
        meta=meta(name), network_id=network_id, security_group_ids=groups)))
    bound = await cloud.api("cloud_admin").BindPort(port_pb2.BindPortRequest(
        id=made.meta.id, node=node, device_id=str(uuid.uuid4())))
    assert isinstance(bound, port_pb2.Port)
    return bound


async def test_a_rule_change_reaches_every_bound_port_of_the_group(
        cloud: NetCloud, nodes: tuple[str, ...]) -> None:
    api = cloud.api()
    net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=meta("e-filtered"))))
    await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        meta=meta("e-filtered-v4"), network_id=net.meta.id, cidr="10.40.0.0/24",
        dhcp_enabled=True)))
    web = await api.CreateSecurityGroup(P.CreateSecurityGroupRequest(
        security_group=P.SecurityGroup(meta=meta("e-web"))))
    db = await api.CreateSecurityGroup(P.CreateSecurityGroupRequest(
        security_group=P.SecurityGroup(meta=meta("e-db"))))
    first = await bound_port(cloud, net.meta.id, "web-1", nodes[0], [web.meta.id])
    # Binding defines the port's filter on its node and names it for the domain's interface.
    assert first.binding_details["port_filter"] == port_nft.filter_name(first.meta.id)
    # nftables filters the tap on the bridge: the domain's interface needs no filterref.
    assert first.binding_details["filterref_xml"] == ""
    defined = await filter_of(cloud, nodes[0], first.meta.id)
    assert defined is not None and "tcp dport 8080" not in defined.filter_xml
    second = await bound_port(cloud, net.meta.id, "web-2", nodes[1], [web.meta.id])
    other = await bound_port(cloud, net.meta.id, "db-1", nodes[0], [db.meta.id])

    rule = await api.CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
        security_group_rule=Rule(security_group_id=web.meta.id, protocol="tcp",
                                 direction=Rule.DIRECTION_INGRESS, port_range_min=8080,
                                 port_range_max=8080, remote_ip_prefix="192.0.2.0/24")))
    for port, node in ((first, nodes[0]), (second, nodes[1])):
        found = await filter_of(cloud, node, port.meta.id)
        assert found is not None, f"no filter for {port.meta.name} on {node}"
        assert found.filter_name == port_nft.filter_name(port.meta.id)
        assert "tcp dport 8080" in found.filter_xml
        assert "ip saddr 192.0.2.0/24 meta l4proto tcp tcp dport 8080 accept" in found.filter_xml
    untouched = await filter_of(cloud, nodes[0], other.meta.id)
    assert untouched is not None and "tcp dport 8080" not in untouched.filter_xml

    # A rule naming web as its remote resolves to the addresses of web's members.
    await api.CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
        security_group_rule=Rule(security_group_id=db.meta.id, protocol="tcp",
                                 direction=Rule.DIRECTION_INGRESS, port_range_min=5432,
                                 port_range_max=5432, remote_group_id=web.meta.id)))
    resolved = await filter_of(cloud, nodes[0], other.meta.id)
    assert resolved is not None
    for member in (first, second):
        assert admits(resolved, member.fixed_ips[0].ip_address, "meta l4proto tcp tcp dport 5432")

    await api.DeleteSecurityGroupRule(P.DeleteSecurityGroupRuleRequest(id=rule.meta.id))
    for port, node in ((first, nodes[0]), (second, nodes[1])):
        found = await filter_of(cloud, node, port.meta.id)
        assert found is not None
        assert "tcp dport 8080" not in found.filter_xml

    # A group used by ports stays.
    with pytest.raises(grpc.aio.AioRpcError) as used:
        await api.DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=web.meta.id))
    assert used.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Unbinding takes the filter off the node it left.
    for port, node in ((first, nodes[0]), (second, nodes[1]), (other, nodes[0])):
        await cloud.api("cloud_admin").UnbindPort(port_pb2.UnbindPortRequest(id=port.meta.id))
        assert await filter_of(cloud, node, port.meta.id) is None
        await api.DeletePort(port_pb2.DeletePortRequest(id=port.meta.id))
    await api.DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=db.meta.id))
    await api.DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=web.meta.id))


async def test_the_default_group_admits_exactly_its_bound_members(
        cloud: NetCloud, nodes: tuple[str, ...]) -> None:
    api = cloud.api()
    net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=meta("e-members"))))
    await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        meta=meta("e-members-v4"), network_id=net.meta.id, cidr="10.41.0.0/24",
        dhcp_enabled=True)))
    first = await bound_port(cloud, net.meta.id, "member-1", nodes[0], [])
    default = await api.GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    assert list(first.security_group_ids) == [default.meta.id]
    mine = first.fixed_ips[0].ip_address
    assert admits(await filter_of(cloud, nodes[0], first.meta.id), mine)

    second = await bound_port(cloud, net.meta.id, "member-2", nodes[1], [])
    theirs = second.fixed_ips[0].ip_address
    # The new member's own filter is defined by its bind; its peers' follow soon after.
    for port, node in ((second, nodes[1]), (first, nodes[0])):
        async def both(port_id: str = port.meta.id, node: str = node) -> bool:
            found = await filter_of(cloud, node, port_id)
            return admits(found, mine) and admits(found, theirs)
        assert await eventually(both, within=10)

    # A port leaving the group (here: a group of its own) is no longer admitted.
    solo = await api.CreateSecurityGroup(P.CreateSecurityGroupRequest(
        security_group=P.SecurityGroup(meta=meta("e-solo"))))
    await api.UpdatePort(port_pb2.UpdatePortRequest(
        port=port_pb2.Port(meta=resource_pb2.ResourceMeta(id=second.meta.id),
                           security_group_ids=[solo.meta.id]),
        update_mask=field_mask_pb2.FieldMask(paths=["security_group_ids"])))
    narrowed = await filter_of(cloud, nodes[0], first.meta.id)
    assert admits(narrowed, mine) and not admits(narrowed, theirs)

    # Deleting a bound port (as an operator may) takes its filter off its node too.
    await cloud.api("cloud_admin").DeletePort(port_pb2.DeletePortRequest(id=second.meta.id,
                                                                          force=True))
    assert await filter_of(cloud, nodes[1], second.meta.id) is None
    await cloud.api("cloud_admin").UnbindPort(port_pb2.UnbindPortRequest(id=first.meta.id))
    await api.DeletePort(port_pb2.DeletePortRequest(id=first.meta.id))
    assert await filter_of(cloud, nodes[0], first.meta.id) is None
    await api.DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=solo.meta.id))


async def test_members_leaving_in_a_burst_are_no_longer_admitted_by_those_who_stay(
        cloud: NetCloud, nodes: tuple[str, ...]) -> None:
    api = cloud.api()
    net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=meta("e-leavers"))))
    await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        meta=meta("e-leavers-v4"), network_id=net.meta.id, cidr="10.42.0.0/24",
        dhcp_enabled=True)))
    stays = await bound_port(cloud, net.meta.id, "stays", nodes[0], [])
    leavers = [await bound_port(cloud, net.meta.id, f"leaver-{i}", nodes[i % 2], [])
               for i in range(4)]
    addresses = [p.fixed_ips[0].ip_address for p in leavers]

    async def admitted(wanted: list[str]) -> bool:
        found = await filter_of(cloud, nodes[0], stays.meta.id)
        return all(admits(found, a) for a in wanted)
    assert await eventually(lambda: admitted(addresses), within=10)

    # Half unbound, half deleted while bound, all at once: the member that stays stops
    # admitting every one of them soon after, and its own address stays admitted.
    admin = cloud.api("cloud_admin")
    await asyncio.gather(*(admin.UnbindPort(port_pb2.UnbindPortRequest(id=p.meta.id))
                           for p in leavers[:2]),
                         *(admin.DeletePort(port_pb2.DeletePortRequest(id=p.meta.id, force=True))
                           for p in leavers[2:]))

    async def none_admitted() -> bool:
        found = await filter_of(cloud, nodes[0], stays.meta.id)
        return not any(admits(found, a) for a in addresses) \
            and admits(found, stays.fixed_ips[0].ip_address)
    assert await eventually(none_admitted, within=10)
    for port in [*leavers[:2], stays]:
        await admin.UnbindPort(port_pb2.UnbindPortRequest(id=port.meta.id))
        await api.DeletePort(port_pb2.DeletePortRequest(id=port.meta.id))


async def test_a_restarted_node_is_sent_whole_filters_when_their_members_change(
        cloud: NetCloud, nodes: tuple[str, ...]) -> None:
    """A member change reaches the nodes as member lists; a node whose agent restarted
    (on the test driver: its filters gone with it) says it holds none of the ports it was
    told of, and is sent their whole filters, the new member admitted."""
    api = cloud.api()
    net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
        network=network_pb2.Network(meta=meta("e-restart"))))
    await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
        meta=meta("e-restart-v4"), network_id=net.meta.id, cidr="10.43.0.0/24",
        dhcp_enabled=True)))
    first = await bound_port(cloud, net.meta.id, "kept", nodes[0], [])
    second = await bound_port(cloud, net.meta.id, "joins", nodes[1], [])

    async def first_admits(address: str) -> bool:
        return admits(await filter_of(cloud, nodes[0], first.meta.id), address)
    assert await eventually(lambda: first_admits(second.fixed_ips[0].ip_address), within=10)

    agent = next(d for d in cloud.agents.started if d.name == f"agent-{nodes[0]}" and d.alive())
    agent.stop()
    cloud.agents.start(nodes[0], {"NUBIS_AGENT__NETWORK_NODE": "false"})
    await cloud.wait_node(nodes[0])
    third = await bound_port(cloud, net.meta.id, "late", nodes[1], [])
    assert await eventually(lambda: first_admits(third.fixed_ips[0].ip_address), within=15)
    assert await first_admits(second.fixed_ips[0].ip_address)
    admin = cloud.api("cloud_admin")
    for port in (first, second, third):
        await admin.UnbindPort(port_pb2.UnbindPortRequest(id=port.meta.id))
        await api.DeletePort(port_pb2.DeletePortRequest(id=port.meta.id))
