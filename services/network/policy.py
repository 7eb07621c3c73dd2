"""Who may call each NetworkService RPC: the one place network's authorization lives.

Networks, subnets, ports, routers, floating IPs and security groups belong to
projects: readers read, members change them, and the domain narrows them to
the caller's project (shared and external networks are visible beyond it;
only cloud-admins make a network shared or external). IP availability is for
a project's admins and operators. Binding ports to nodes is what compute does
while it builds, moves and deletes servers: the `service` role or cloud-admin;
compute also reads networks and makes, reads and deletes ports for the
project it names (the `service` role passes those rules too).
"""

from __future__ import annotations

from services.common import policy

SERVICE = "nubis.network.v1.NetworkService"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _crud(noun: str, plural: str) -> dict[str, policy.Rule]:
    return {
        _method(f"Get{noun}"): policy.reader(),
        _method(f"List{plural}"): policy.reader(),
        _method(f"Create{noun}"): policy.member(),
        _method(f"Update{noun}"): policy.member(),
        _method(f"Delete{noun}"): policy.member(),
    }


def _crud_or_service(noun: str, plural: str) -> dict[str, policy.Rule]:
    """CRUD a nubis service (compute making a server's ports) may also call, for any project."""
    return {
        _method(f"Get{noun}"): policy.reader_or_service(),
        _method(f"List{plural}"): policy.reader_or_service(),
        _method(f"Create{noun}"): policy.member_or_service(),
        _method(f"Update{noun}"): policy.member_or_service(),
        _method(f"Delete{noun}"): policy.member_or_service(),
    }


TABLE: policy.PolicyTable = {
    **_crud("Network", "Networks"),
    _method("GetNetwork"): policy.reader_or_service(),
    _method("ListNetworks"): policy.reader_or_service(),
    _method("GetNetworkIpAvailability"): policy.admin(),
    **_crud("Subnet", "Subnets"),
    **_crud_or_service("Port", "Ports"),
    _method("WatchPorts"): policy.reader(),
    _method("BindPort"): policy.service_or_cloud_admin(),
    _method("UnbindPort"): policy.service_or_cloud_admin(),
    **_crud("Router", "Routers"),
    _method("AddRouterInterface"): policy.member(),
    _method("RemoveRouterInterface"): policy.member(),
    **_crud("FloatingIp", "FloatingIps"),
    _method("AssociateFloatingIp"): policy.member(),
    _method("DisassociateFloatingIp"): policy.member(),
    **_crud("SecurityGroup", "SecurityGroups"),
    # Compute resolves the group names of a boot in the instance's project.
    _method("ListSecurityGroups"): policy.reader_or_service(),
    _method("GetSecurityGroupRule"): policy.reader(),
    _method("ListSecurityGroupRules"): policy.reader(),
    _method("CreateSecurityGroupRule"): policy.member(),
    _method("DeleteSecurityGroupRule"): policy.member(),
}
