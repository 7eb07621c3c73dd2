"""Security groups and rules over the API: the default group, rule checks, quotas, races."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import security_group_pb2

from services.client import rpc_errors
from services.network import security_group
from tests.functional.network.harness import NetCloud

P = security_group_pb2
Rule = P.SecurityGroupRule


def reason(exc: grpc.aio.AioRpcError) -> str:
    return rpc_errors.domain_error(exc, "network").reason


def fields(exc: grpc.aio.AioRpcError) -> set[str]:
    error = rpc_errors.domain_error(exc, "network")
    return {violation.field for violation in getattr(error, "violations", [])}


async def make_group(cloud: NetCloud, name: str, caller: str = "a_member",
                     **options: Any) -> P.SecurityGroup:
    group = P.SecurityGroup(meta=resource_pb2.ResourceMeta(name=name))
    made = await cloud.api(caller).CreateSecurityGroup(
        P.CreateSecurityGroupRequest(security_group=group, **options))
    assert isinstance(made, P.SecurityGroup)
    return made


def tcp(group_id: str, low: int, high: int, **extra: Any) -> P.CreateSecurityGroupRuleRequest:
    return P.CreateSecurityGroupRuleRequest(security_group_rule=Rule(
        security_group_id=group_id, direction=Rule.DIRECTION_INGRESS, protocol="tcp",
        port_range_min=low, port_range_max=high, **extra))


async def test_default_group_allows_egress_and_ingress_from_its_members(
        cloud: NetCloud) -> None:
    listed = await cloud.api("a_reader").ListSecurityGroups(P.ListSecurityGroupsRequest())
    defaults = [group for group in listed.security_groups if group.meta.name == "default"]
    assert len(defaults) == 1
    default = defaults[0]
    assert default.meta.project_id == cloud.world.project_a
    assert default.stateful
    egress = {rule.ether_type for rule in default.rules
              if rule.direction == Rule.DIRECTION_EGRESS and not rule.remote_group_id
              and not rule.remote_ip_prefix and not rule.protocol}
    ingress = {rule.ether_type for rule in default.rules
               if rule.direction == Rule.DIRECTION_INGRESS
               and rule.remote_group_id == default.meta.id}
    assert egress == ingress == {Rule.ETHER_TYPE_IPV4, Rule.ETHER_TYPE_IPV6}
    assert len(default.rules) == 4
    by_name = await cloud.api("a_reader").GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    assert by_name.meta.id == default.meta.id


async def test_default_group_is_made_once_whatever_races(cloud: NetCloud) -> None:
    project = await cloud.world.make_project("sg-race")
    made = await asyncio.gather(*(security_group.ensure_default(cloud.store, project)
                                  for _ in range(8)))
    assert len({group.meta.id for group in made}) == 1
    everyone, _ = await cloud.store.list_all("network/security-groups/", P.SecurityGroup)
    assert sum(item.value.meta.project_id == project for item in everyone) == 1


async def test_default_group_cannot_be_deleted_or_renamed_by_the_project(
        cloud: NetCloud) -> None:
    default = await cloud.api("a_admin").GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    with pytest.raises(grpc.aio.AioRpcError) as deleted:
        await cloud.api("a_admin").DeleteSecurityGroup(
            P.DeleteSecurityGroupRequest(id=default.meta.id))
    assert deleted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(deleted.value) == "nubis.security_group.default"
    renamed = P.SecurityGroup(meta=resource_pb2.ResourceMeta(id=default.meta.id, name="other"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.api("a_admin").UpdateSecurityGroup(P.UpdateSecurityGroupRequest(
            security_group=renamed, update_mask=field_mask_pb2.FieldMask(paths=["meta.name"])))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await make_group(cloud, "default")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_new_group_allows_all_egress_and_its_name_is_unique(cloud: NetCloud) -> None:
    group = await make_group(cloud, "web")
    assert group.stateful
    assert {(rule.direction, rule.ether_type) for rule in group.rules} == {
        (Rule.DIRECTION_EGRESS, Rule.ETHER_TYPE_IPV4),
        (Rule.DIRECTION_EGRESS, Rule.ETHER_TYPE_IPV6)}
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await make_group(cloud, "web")
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
    bare = await make_group(cloud, "bare", skip_default_rules=True)
    assert not bare.rules
    # Project B may use the same name; it cannot see A's group.
    await make_group(cloud, "web", caller="b_admin")
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await cloud.api("b_admin").GetSecurityGroup(P.GetSecurityGroupRequest(id=group.meta.id))
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("rule", "field"), [
    (dict(protocol="tcp", port_range_min=0, port_range_max=80), "port_range_min"),
    (dict(protocol="tcp", port_range_min=80, port_range_max=65536), "port_range_max"),
    (dict(protocol="udp", port_range_min=70000, port_range_max=70000), "port_range_min"),
    (dict(protocol="tcp", port_range_min=443, port_range_max=80), "port_range_min"),
    (dict(protocol="bogus"), "protocol"),
    (dict(protocol="300"), "protocol"),
    (dict(protocol="gre", port_range_min=1, port_range_max=2), "port_range_min"),
    (dict(protocol="icmp", port_range_min=256, port_range_max=0), "port_range_min"),
    (dict(remote_ip_prefix="10.0.0.300/24"), "remote_ip_prefix"),
    (dict(remote_ip_prefix="fd00::/64"), "remote_ip_prefix"),
    (dict(direction=Rule.DIRECTION_UNSPECIFIED), "direction"),
], ids=["port-0", "port-65536", "udp-70000", "min-above-max", "unknown-protocol",
        "protocol-number-300", "ports-on-gre", "icmp-type-256", "bad-cidr", "family-mismatch",
        "no-direction"])
async def test_invalid_rules_name_the_field(cloud: NetCloud, rule: dict[str, Any],
                                           field: str) -> None:
    group = await cloud.api().GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    wanted = Rule(security_group_id=group.meta.id, direction=Rule.DIRECTION_INGRESS)
    for name, value in rule.items():
        setattr(wanted, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.api().CreateSecurityGroupRule(
            P.CreateSecurityGroupRuleRequest(security_group_rule=wanted))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"security_group_rule.{field}" in fields(refused.value)


async def test_remote_group_of_another_project_is_invalid(cloud: NetCloud) -> None:
    mine = await cloud.api().GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    theirs = await cloud.api("b_admin").GetSecurityGroup(P.GetSecurityGroupRequest(id="default"))
    rule = Rule(security_group_id=mine.meta.id, direction=Rule.DIRECTION_INGRESS,
                remote_group_id=theirs.meta.id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.api().CreateSecurityGroupRule(
            P.CreateSecurityGroupRuleRequest(security_group_rule=rule))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fields(refused.value) == {"security_group_rule.remote_group_id"}


async def test_rules_are_normalized_and_duplicates_refused(cloud: NetCloud) -> None:
    group = await make_group(cloud, "normal")
    made = await cloud.api().CreateSecurityGroupRule(tcp(group.meta.id, 22, 22,
                                                         remote_ip_prefix="10.1.2.3/8"))
    assert (made.protocol, made.remote_ip_prefix, made.ether_type) == (
        "tcp", "10.0.0.0/8", Rule.ETHER_TYPE_IPV4)
    with pytest.raises(grpc.aio.AioRpcError) as twin:
        await cloud.api().CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
            security_group_rule=Rule(security_group_id=group.meta.id, protocol="6",
                                     direction=Rule.DIRECTION_INGRESS, port_range_min=22,
                                     port_range_max=22, remote_ip_prefix="10.0.0.0/8")))
    assert twin.value.code() == grpc.StatusCode.ALREADY_EXISTS
    icmp = await cloud.api().CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
        security_group_rule=Rule(security_group_id=group.meta.id, protocol="icmp",
                                 direction=Rule.DIRECTION_INGRESS,
                                 ether_type=Rule.ETHER_TYPE_IPV6)))
    assert (icmp.protocol, icmp.port_range_min, icmp.port_range_max) == ("icmpv6", -1, -1)
    fetched = await cloud.api("a_reader").GetSecurityGroupRule(
        P.GetSecurityGroupRuleRequest(id=made.meta.id))
    assert fetched.security_group_id == group.meta.id
    listed = await cloud.api("a_reader").ListSecurityGroupRules(
        P.ListSecurityGroupRulesRequest(filter=f"security_group_id={group.meta.id} protocol=tcp"))
    assert [rule.meta.id for rule in listed.security_group_rules] == [made.meta.id]
    await cloud.api().DeleteSecurityGroupRule(P.DeleteSecurityGroupRuleRequest(id=made.meta.id))
    after = await cloud.api().GetSecurityGroup(P.GetSecurityGroupRequest(id=group.meta.id))
    assert made.meta.id not in {rule.meta.id for rule in after.rules}


async def test_group_named_as_remote_or_used_by_a_port_cannot_be_deleted(
        cloud: NetCloud) -> None:
    target = await make_group(cloud, "target")
    user = await make_group(cloud, "user")
    await cloud.api().CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
        security_group_rule=Rule(security_group_id=user.meta.id,
                                 direction=Rule.DIRECTION_INGRESS,
                                 remote_group_id=target.meta.id)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await cloud.api().DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=target.meta.id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(refused.value) == "nubis.security_group.in_use"
    still = await cloud.api().GetSecurityGroup(P.GetSecurityGroupRequest(id=target.meta.id))
    assert still.state == P.SecurityGroup.ACTIVE
    await cloud.api().DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=user.meta.id))
    await cloud.api().DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=target.meta.id))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await cloud.api().GetSecurityGroup(P.GetSecurityGroupRequest(id=target.meta.id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_quotas_count_groups_and_rules(cloud: NetCloud) -> None:
    world = cloud.world
    project = await world.make_project("sg-quota")
    user = await world.make_user("sg-quota-member", project, "member")
    assert user
    world.tokens["quota_member"] = await world.login("sg-quota-member", project)
    await world.stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project,
                                 limits={"security_groups": 1, "security_group_rules": 3}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.security_groups",
                                                    "limits.security_group_rules"])),
        metadata=world.metadata("cloud_admin"))
    # The default group and its own rules count against nothing.
    group = await make_group(cloud, "counted", caller="quota_member")  # 1 group, 2 rules
    with pytest.raises(grpc.aio.AioRpcError) as groups:
        await make_group(cloud, "second", caller="quota_member")
    assert groups.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(groups.value) == "nubis.quota.exceeded"
    api = cloud.api("quota_member")
    await api.CreateSecurityGroupRule(tcp(group.meta.id, 80, 80))  # the 3rd rule
    with pytest.raises(grpc.aio.AioRpcError) as rules:
        await api.CreateSecurityGroupRule(tcp(group.meta.id, 443, 443))
    assert rules.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Deleting the group gives back the group and its three rules.
    await api.DeleteSecurityGroup(P.DeleteSecurityGroupRequest(id=group.meta.id))
    again = await make_group(cloud, "again", caller="quota_member")
    await api.CreateSecurityGroupRule(tcp(again.meta.id, 443, 443))


async def test_racing_rules_fill_the_quota_exactly(cloud: NetCloud) -> None:
    world = cloud.world
    project = await world.make_project("sg-race-quota")
    await world.make_user("sg-race-member", project, "member")
    world.tokens["race_member"] = await world.login("sg-race-member", project)
    await world.stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project, limits={"security_group_rules": 7}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits.security_group_rules"])),
        metadata=world.metadata("cloud_admin"))
    group = await make_group(cloud, "raced", caller="race_member")  # 2 egress rules
    api = cloud.api("race_member")
    outcomes = await asyncio.gather(*(api.CreateSecurityGroupRule(tcp(group.meta.id, port, port))
                                      for port in range(1000, 1012)), return_exceptions=True)
    made = [item for item in outcomes if isinstance(item, Rule)]
    refused = [item for item in outcomes if isinstance(item, grpc.aio.AioRpcError)]
    assert len(made) == 5, outcomes
    assert {exc.code() for exc in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    after = await api.GetSecurityGroup(P.GetSecurityGroupRequest(id=group.meta.id))
    assert len(after.rules) == 7
    assert {rule.meta.id for rule in made} <= {rule.meta.id for rule in after.rules}
