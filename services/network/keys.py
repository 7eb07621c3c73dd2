"""Network's etcd keys (relative to the store root), one function per record."""

from __future__ import annotations

from services.common import resources

NETWORKS = "network/networks/"
SUBNETS = "network/subnets/"
PORTS = "network/ports/"
ROUTERS = "network/routers/"
FLOATING_IPS = "network/floating-ips/"
FLOATING_IP_TARGETS = "network/floating-ip-targets/"
SECURITY_GROUPS = "network/security-groups/"
SECURITY_GROUP_RULES = "network/security-group-rules/"
# A group's name is unique in its project: one key per (project, name).
SECURITY_GROUP_NAMES = "network/security-group-names/"
# Uniqueness by construction (create-if-absent): one key per address, MAC, VNI.
IPAM = "network/ipam/"
MACS = "network/macs/"
SEGMENTS = "network/segments/"
# Which nodes carry a network (bound port counts), and realizations behind their desired state.
ATTACHMENTS = "network/attachments/"
NETWORK_PORTS = "network/network-ports/"
REALIZE = "network/realize/"


def network(network_id: str) -> str:
    return resources.key(NETWORKS, network_id)


def subnet(subnet_id: str) -> str:
    return resources.key(SUBNETS, subnet_id)


def port(port_id: str) -> str:
    return resources.key(PORTS, port_id)


def router(router_id: str) -> str:
    return resources.key(ROUTERS, router_id)


def floating_ip(floating_ip_id: str) -> str:
    return resources.key(FLOATING_IPS, floating_ip_id)


def floating_ip_target(port_id: str, address: str) -> str:
    """Created with an association: a fixed IP is the target of one floating IP at most."""
    return resources.key(FLOATING_IP_TARGETS, port_id, address)


def security_group(group_id: str) -> str:
    return resources.key(SECURITY_GROUPS, group_id)


def security_group_rule(rule_id: str) -> str:
    return resources.key(SECURITY_GROUP_RULES, rule_id)


def security_group_name(project_id: str, name: str) -> str:
    """Created with the group: holding it is owning the name in the project."""
    return resources.scoped(SECURITY_GROUP_NAMES, project_id, name)


def fixed_ip(subnet_id: str, address: str) -> str:
    """Created only if absent: holding it is owning the address."""
    return resources.key(IPAM, subnet_id, address)


def subnet_ips(subnet_id: str) -> str:
    """The prefix of every address allocated in a subnet (its used addresses)."""
    return resources.key(IPAM, subnet_id, "")


def mac(address: str) -> str:
    return resources.key(MACS, address)


def segment(vni: int) -> str:
    return resources.key(SEGMENTS, str(vni))


def attachments(network_id: str) -> str:
    return resources.key(ATTACHMENTS, network_id)


def pending(network_id: str, node: str) -> str:
    """Present while `node`'s realization of the network is behind its desired state."""
    return resources.key(REALIZE, network_id, node)


def network_port(network_id: str, port_id: str) -> str:
    """Index of a network's ports: present while the port exists, with its binding node."""
    return resources.key(NETWORK_PORTS, network_id, port_id)


def network_ports(network_id: str) -> str:
    return resources.key(NETWORK_PORTS, network_id, "")
