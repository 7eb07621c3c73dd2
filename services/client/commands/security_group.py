"""`nubis security-group|security-group-rule ...`: allow-lists of traffic applied to ports."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import security_group_pb2

from services.client import cli_context
from services.client.commands import service_call
from services.client.commands.network import (
    AllProjects,
    Description,
    Filter,
    call,
    deleted,
    listing,
    security_groups,
    show,
    table,
)

if TYPE_CHECKING:
    from services.client.commands.network import Stub
G = security_group_pb2
Rule = G.SecurityGroupRule

group_app = typer.Typer(help="Security groups: what traffic may reach and leave ports.",
                        no_args_is_help=True)
rule_app = typer.Typer(help="Rules of security groups (immutable: delete and create).",
                       no_args_is_help=True)


def _rule_row(rule: security_group_pb2.SecurityGroupRule) -> dict[str, Any]:
    ports = ""
    if rule.port_range_min or rule.port_range_max:
        ports = str(rule.port_range_min) if rule.port_range_min == rule.port_range_max \
            else f"{rule.port_range_min}:{rule.port_range_max}"
    return service_call.flat(
        rule, state=service_call.state_name(rule),
        direction=Rule.Direction.Name(rule.direction).removeprefix("DIRECTION_").lower(),
        ether_type=Rule.EtherType.Name(rule.ether_type).removeprefix("ETHER_TYPE_")
        .replace("IPV", "IPv").replace("UNSPECIFIED", "IPv4"),
        protocol=rule.protocol or "any", ports=ports,
        remote=f"group:{rule.remote_group_id}" if rule.remote_group_id
        else rule.remote_ip_prefix or "any")


def _group_row(group: security_group_pb2.SecurityGroup) -> dict[str, Any]:
    row = service_call.flat(group, state=service_call.state_name(group),
                            stateful=group.stateful)
    row["rules"] = [_rule_row(rule) for rule in group.rules]
    return row


def _show_group(ctx: typer.Context, group: security_group_pb2.SecurityGroup) -> None:
    row = _group_row(group)
    if not cli_context.get(ctx).output.json:
        row["rules"] = [f"{r['direction']} {r['ether_type']} {r['protocol']} "
                        f"{r['ports'] or 'all'} from/to {r['remote']}" for r in row["rules"]]
    show(ctx, row, "security group")


@group_app.command("create")
def group_create(
    ctx: typer.Context, name: str,
    no_default_rules: Annotated[bool, typer.Option(
        "--no-default-rules", help="Without the two 'allow all egress' rules.")] = False,
    stateless: Annotated[bool, typer.Option("--stateless", help="No connection tracking: "
                                            "replies need their own rules.")] = False,
    description: Description = "",
) -> None:
    """Create a security group (allowing all egress unless --no-default-rules)."""
    group = G.SecurityGroup(meta=resource_pb2.ResourceMeta(name=name, description=description),
                            stateful=not stateless)
    created = call(ctx, lambda s: s.CreateSecurityGroup(G.CreateSecurityGroupRequest(
        security_group=group, skip_default_rules=no_default_rules,
        request_id=service_call.request_id())))
    _show_group(ctx, created)


@group_app.command("list")
def group_list(ctx: typer.Context, all_projects: AllProjects = False,
               filter_: Filter = "") -> None:
    """List your project's security groups."""
    found = call(ctx, lambda s: listing(s.ListSecurityGroups, G.ListSecurityGroupsRequest,
                                        "security_groups", all_projects=all_projects,
                                        filter=filter_))
    rows = [{**_group_row(g), "rules": len(g.rules)} for g in found]
    table(ctx, rows, ["id", "name", "project_id", "rules", "description"])


@group_app.command("show")
def group_show(ctx: typer.Context, group: str) -> None:
    """Show one security group and its rules (id or name)."""
    async def run(s: Stub) -> security_group_pb2.SecurityGroup:
        return await s.GetSecurityGroup(G.GetSecurityGroupRequest(
            id=await security_groups(s).id_of(group)))
    _show_group(ctx, call(ctx, run))


@group_app.command("delete")
def group_delete(ctx: typer.Context, group: str) -> None:
    """Delete a security group and its rules (refused while ports use it)."""
    async def run(s: Stub) -> None:
        await s.DeleteSecurityGroup(G.DeleteSecurityGroupRequest(
            id=await security_groups(s).id_of(group)))
    call(ctx, run)
    deleted(ctx, "security group", group)


# -- rules -----------------------------------------------------------------------


class Direction(enum.StrEnum):
    INGRESS = "ingress"
    EGRESS = "egress"


class EtherType(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"


def port_range(text: str) -> tuple[int, int]:
    """`22` or `8000:8080` (for icmp: TYPE or TYPE:CODE); the service checks the bounds."""
    if not text:
        return 0, 0
    low, _, high = text.partition(":")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not PORT or MIN:MAX") from None


@rule_app.command("create")
def rule_create(
    ctx: typer.Context,
    group: Annotated[str, typer.Argument(help="Security group (id or name).")],
    direction: Annotated[Direction, typer.Option("--direction", case_sensitive=False)] =
    Direction.INGRESS,
    ether_type: Annotated[EtherType, typer.Option("--ethertype", case_sensitive=False)] =
    EtherType.IPV4,
    protocol: Annotated[str, typer.Option("--protocol", help="tcp, udp, icmp, icmpv6, a "
                                          "number, or '' for any.")] = "",
    ports: Annotated[str, typer.Option("--port", help="PORT or MIN:MAX (icmp: TYPE:CODE).")]
    = "",
    remote_ip: Annotated[str, typer.Option("--remote-ip", help="Peer CIDR.")] = "",
    remote_group: Annotated[str, typer.Option("--remote-group",
                                              help="Peer group (id or name).")] = "",
    description: Description = "",
) -> None:
    """Allow some traffic: add a rule to a group."""
    low, high = port_range(ports)

    async def run(s: Stub) -> security_group_pb2.SecurityGroupRule:
        kinds = security_groups(s)
        rule = Rule(
            meta=resource_pb2.ResourceMeta(description=description),
            security_group_id=await kinds.id_of(group),
            direction=Rule.DIRECTION_INGRESS if direction is Direction.INGRESS
            else Rule.DIRECTION_EGRESS,
            ether_type=Rule.ETHER_TYPE_IPV6 if ether_type is EtherType.IPV6
            else Rule.ETHER_TYPE_IPV4,
            protocol=protocol, port_range_min=low, port_range_max=high,
            remote_ip_prefix=remote_ip, remote_group_id=await kinds.id_of(remote_group))
        return await s.CreateSecurityGroupRule(G.CreateSecurityGroupRuleRequest(
            security_group_rule=rule, request_id=service_call.request_id()))
    show(ctx, _rule_row(call(ctx, run)), "security group rule")


@rule_app.command("list")
def rule_list(
    ctx: typer.Context,
    group: Annotated[str, typer.Option("--group", help="Only this group's rules.")] = "",
    all_projects: AllProjects = False, filter_: Filter = "",
) -> None:
    """List security group rules."""
    async def run(s: Stub) -> list[Any]:
        terms = filter_
        if group:
            terms = f"{terms} security_group_id={await security_groups(s).id_of(group)}".strip()
        return await listing(s.ListSecurityGroupRules, G.ListSecurityGroupRulesRequest,
                             "security_group_rules", all_projects=all_projects, filter=terms)
    table(ctx, [_rule_row(r) for r in call(ctx, run)],
          ["id", "security_group_id", "direction", "ether_type", "protocol", "ports", "remote"])


@rule_app.command("show")
def rule_show(ctx: typer.Context, rule: str) -> None:
    """Show one rule (by id)."""
    found = call(ctx, lambda s: s.GetSecurityGroupRule(G.GetSecurityGroupRuleRequest(id=rule)))
    show(ctx, _rule_row(found), "security group rule")


@rule_app.command("delete")
def rule_delete(ctx: typer.Context, rule: str) -> None:
    """Delete a rule (by id); ports of its group lose what it allowed."""
    call(ctx, lambda s: s.DeleteSecurityGroupRule(G.DeleteSecurityGroupRuleRequest(id=rule)))
    deleted(ctx, "security group rule", rule)
