"""Names of the devices nubis makes on nodes for its networks and routers, written once.

Every name is a pure function of a resource id, so an agent that restarts (or
another one on the same node) finds what an earlier run made, and teardown
needs nothing but the id. Linux interface names hold at most 15 characters:
a prefix of up to 5 and the first 10 hex digits of the id fit.
"""

from __future__ import annotations

import re

IFNAME_MAX = 15
"""Longest Linux interface name (IFNAMSIZ less the NUL)."""

_ID_DIGITS = 10
_HEX = re.compile(r"[0-9a-f]+")


def short_id(resource_id: str) -> str:
    """The first 10 hex digits of a UUID-like id (dashes dropped, lower case)."""
    digits = "".join(_HEX.findall(resource_id.lower()))
    if len(digits) < _ID_DIGITS:
        raise ValueError(f"{resource_id!r} has fewer than {_ID_DIGITS} hex digits")
    return digits[:_ID_DIGITS]


def bridge(network_id: str) -> str:
    """The Linux bridge of a nubis network on every node that has it."""
    return f"nbr-{short_id(network_id)}"


def vxlan(network_id: str) -> str:
    """The VXLAN interface (the network's VNI) enslaved to the network's bridge."""
    return f"nvx-{short_id(network_id)}"


def dhcp_namespace(network_id: str, scope: str = "") -> str:
    """The network namespace the network's DHCP server (dnsmasq) answers from.

    Namespace names are global to a machine; `scope` (the namespace a
    dataplane runs in, when it is not the host's) keeps two dataplanes on one
    machine, as in tests, apart.
    """
    return f"{scope}.ndhcp-{short_id(network_id)}" if scope else f"ndhcp-{short_id(network_id)}"


def dhcp_veth(network_id: str) -> str:
    """Bridge end of the veth pair joining the DHCP namespace to the network's bridge."""
    return f"ndh-{short_id(network_id)}"


def dhcp_veth_peer(network_id: str) -> str:
    """Namespace end of that veth pair, the DHCP server's interface."""
    return f"ndp-{short_id(network_id)}"


def tap(port_id: str) -> str:
    """The tap device (libvirt `<target dev>`) of a guest's port."""
    return f"ntap-{short_id(port_id)}"


def router_namespace(router_id: str, scope: str = "") -> str:
    """The network namespace of a router on a network node (`scope` as for dhcp_namespace)."""
    return f"{scope}.nrouter-{router_id}" if scope else f"nrouter-{router_id}"


def router_table(router_id: str) -> str:
    """The nftables table (family inet) holding a router's SNAT/DNAT rules."""
    return f"nubis_router_{short_id(router_id)}"
