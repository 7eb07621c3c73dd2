"""What a node must hold for a nubis router, as pure functions both dataplanes share.

A router is a network namespace with IPv4 forwarding on, one veth leg per
network it joins (the namespace end holds the router's address and MAC, the
other end is a port of the network's bridge), a default route out of the
gateway leg, and one nftables table (family inet, inside the namespace) with
its NAT: SNAT of the internal subnets to the gateway address and, per
floating IP, DNAT floating → fixed plus SNAT fixed → floating. Floating
addresses sit on the gateway leg as /32s, so the external network finds them
by ARP.

`check` validates an ensure request, `desired` turns it into the
`RealizedRouter` the node must reach, `steps` lists the commands that take a
node from what it holds there, and `ruleset` is the nft script that replaces
the router's table whole (one atomic transaction).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass

from nubis.agent.v1 import tasks_pb2

from services.common import errors, network_devices

Step = tuple[str, ...]
"""One command's argv. ("nft-load", namespace, script) stands for `nft -f -` run in the
namespace with the script on its standard input."""
NFT_LOAD = "nft-load"

LEG_ALIAS_PREFIX = "nubis-router-leg:"
"""ifalias of a router's leg: the prefix, then `<router id>:<network id>`."""

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


# --- device names ------------------------------------------------------------------


def leg(network_id: str) -> str:
    """The router's device on an internal network, inside the router's namespace."""
    return f"qr-{network_devices.short_id(network_id)}"


def gateway_leg(network_id: str) -> str:
    """The router's device on its external network, inside the router's namespace."""
    return f"qg-{network_devices.short_id(network_id)}"


def leg_peer(router_id: str, network_id: str) -> str:
    """The bridge end of a router's leg: unique per (router, network) on the node."""
    digest = hashlib.sha256(f"{router_id}/{network_id}".encode()).hexdigest()
    return f"nrl-{digest[:11]}"


def leg_alias(router_id: str, network_id: str) -> str:
    return f"{LEG_ALIAS_PREFIX}{router_id}:{network_id}"


def network_of_alias(alias: str) -> str:
    """The network id a leg's ifalias names, "" if it is not a router leg's."""
    if not alias.startswith(LEG_ALIAS_PREFIX):
        return ""
    return alias[len(LEG_ALIAS_PREFIX):].partition(":")[2]


# --- checking a request ---------------------------------------------------------------


def check(request: tasks_pb2.EnsureRouterRequest) -> None:
    """InvalidArgument naming every bad field of an ensure request."""
    bad: list[errors.FieldViolation] = []
    if not _UUID.match(request.router_id):
        bad.append(errors.FieldViolation("router_id", "must be a lower-case UUID"))
    subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    macs: dict[str, str] = {}
    for i, interface in enumerate(request.interfaces):
        where = f"interfaces[{i}]"
        _check_leg(interface.network_id, interface.address, interface.mac_address, where, bad)
        parsed = _interface(interface.address)
        if parsed is not None:
            subnets.append(parsed.network)
        seen = macs.setdefault(interface.network_id, interface.mac_address.lower())
        if seen != interface.mac_address.lower():
            bad.append(errors.FieldViolation(f"{where}.mac_address",
                                             "differs from another interface on the network"))
    if request.HasField("gateway"):
        _check_gateway(request.gateway, macs, bad)
    elif request.floating_ips:
        bad.append(errors.FieldViolation("floating_ips", "need a gateway"))
    _check_floating_ips(request, subnets, bad)
    for i, route in enumerate(request.routes):
        _check_route(route, f"routes[{i}]", subnets, bad)
    if bad:
        raise errors.InvalidArgument("the router cannot be realized as given", violations=bad)


def _interface(text: str) -> IPInterface | None:
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return None


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _check_leg(network_id: str, address: str, mac: str, where: str,
               bad: list[errors.FieldViolation]) -> None:
    if not _UUID.match(network_id):
        bad.append(errors.FieldViolation(f"{where}.network_id", "must be a lower-case UUID"))
    if _interface(address) is None:
        bad.append(errors.FieldViolation(f"{where}.address",
                                         "must be an address with its prefix (10.0.0.1/24)"))
    if not _MAC.match(mac):
        bad.append(errors.FieldViolation(f"{where}.mac_address",
                                         "must be a MAC (aa:bb:cc:dd:ee:ff)"))


def _check_gateway(gateway: tasks_pb2.RouterGateway, macs: dict[str, str],
                   bad: list[errors.FieldViolation]) -> None:
    _check_leg(gateway.network_id, gateway.address, gateway.mac_address, "gateway", bad)
    if gateway.network_id in macs:
        bad.append(errors.FieldViolation("gateway.network_id",
                                         "is also one of the router's internal networks"))
    address = _interface(gateway.address)
    if address is not None and address.version != 4:
        bad.append(errors.FieldViolation("gateway.address", "must be IPv4 (NAT is IPv4 only)"))
    if gateway.next_hop:
        hop = _address(gateway.next_hop)
        if hop is None or address is None or hop not in address.network:
            bad.append(errors.FieldViolation("gateway.next_hop",
                                             "must be an address inside the gateway's subnet"))


def _check_floating_ips(request: tasks_pb2.EnsureRouterRequest,
                        subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                        bad: list[errors.FieldViolation]) -> None:
    floating_seen: set[str] = set()
    for i, floating in enumerate(request.floating_ips):
        where = f"floating_ips[{i}]"
        address = _address(floating.floating_ip_address)
        if address is None or address.version != 4:
            bad.append(errors.FieldViolation(f"{where}.floating_ip_address",
                                             "must be an IPv4 address"))
        elif floating.floating_ip_address in floating_seen:
            bad.append(errors.FieldViolation(f"{where}.floating_ip_address", "is listed twice"))
        floating_seen.add(floating.floating_ip_address)
        fixed = _address(floating.fixed_ip_address)
        if fixed is None or fixed.version != 4:
            bad.append(errors.FieldViolation(f"{where}.fixed_ip_address",
                                             "must be an IPv4 address"))
        elif not any(fixed in subnet for subnet in subnets):
            bad.append(errors.FieldViolation(f"{where}.fixed_ip_address",
                                             "is on none of the router's networks"))


def _check_route(route: tasks_pb2.RouterRoute, where: str,
                 subnets: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
                 bad: list[errors.FieldViolation]) -> None:
    try:
        ipaddress.ip_network(route.destination)
    except ValueError:
        bad.append(errors.FieldViolation(f"{where}.destination", "must be a CIDR"))
    hop = _address(route.nexthop)
    if hop is None or not any(hop in subnet for subnet in subnets):
        bad.append(errors.FieldViolation(f"{where}.nexthop",
                                         "must be an address on one of the router's networks"))


# --- the state to reach ------------------------------------------------------------------


@dataclass(frozen=True)
class Leg:
    """One leg the router must have, with what the realized state does not show."""

    network_id: str
    device: str
    peer: str
    bridge: str
    mac: str
    addresses: tuple[str, ...]
    gateway: bool


def legs(request: tasks_pb2.EnsureRouterRequest) -> list[Leg]:
    """The legs of the router, one per network, sorted by device."""
    by_network: dict[str, list[str]] = {}
    macs: dict[str, str] = {}
    for interface in request.interfaces:
        by_network.setdefault(interface.network_id, []).append(
            str(ipaddress.ip_interface(interface.address)))
        macs[interface.network_id] = interface.mac_address.lower()
    found = [Leg(network_id, leg(network_id), leg_peer(request.router_id, network_id),
                 network_devices.bridge(network_id), macs[network_id],
                 tuple(sorted(set(addresses))), False)
             for network_id, addresses in by_network.items()]
    if request.HasField("gateway"):
        gateway = request.gateway
        addresses = {str(ipaddress.ip_interface(gateway.address))}
        addresses.update(f"{f.floating_ip_address}/32" for f in request.floating_ips)
        found.append(Leg(gateway.network_id, gateway_leg(gateway.network_id),
                         leg_peer(request.router_id, gateway.network_id),
                         network_devices.bridge(gateway.network_id), gateway.mac_address.lower(),
                         tuple(sorted(addresses)), True))
    return sorted(found, key=lambda item: item.device)


def routes(request: tasks_pb2.EnsureRouterRequest) -> list[str]:
    """The routes of the namespace, as RealizedRouter.routes writes them, sorted."""
    found = {f"{_destination(r.destination)} via {r.nexthop}" for r in request.routes}
    if request.HasField("gateway") and request.gateway.next_hop:
        found.add(f"default via {request.gateway.next_hop}")
    return sorted(found)


def _destination(text: str) -> str:
    """A route's destination as `ip -j route` shows it: a host route without its prefix."""
    network = ipaddress.ip_network(text, strict=False)
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def nat_rules(request: tasks_pb2.EnsureRouterRequest) -> list[str]:
    """The NAT of the router, as RealizedRouter.nat_rules writes it, sorted."""
    if not request.HasField("gateway"):
        return []
    gateway_address = str(ipaddress.ip_interface(request.gateway.address).ip)
    found = set()
    for floating in request.floating_ips:
        found.add(f"dnat {floating.floating_ip_address} to {floating.fixed_ip_address}")
        found.add(f"snat {floating.fixed_ip_address} to {floating.floating_ip_address}")
    if request.gateway.enable_snat:
        for subnet in _internal_subnets(request):
            found.add(f"snat {subnet} to {gateway_address}")
    return sorted(found)


def _internal_subnets(request: tasks_pb2.EnsureRouterRequest) -> list[ipaddress.IPv4Network]:
    subnets = {ipaddress.ip_interface(i.address).network for i in request.interfaces}
    return sorted(s for s in subnets if isinstance(s, ipaddress.IPv4Network))


def desired(request: tasks_pb2.EnsureRouterRequest, scope: str) -> tasks_pb2.RealizedRouter:
    """The router as the node must hold it."""
    state = tasks_pb2.RealizedRouter(
        router_id=request.router_id,
        namespace=network_devices.router_namespace(request.router_id, scope),
        nft_table=network_devices.router_table(request.router_id),
        routes=routes(request), ip_forwarding=True, nat_rules=nat_rules(request),
    )
    for item in legs(request):
        state.legs.add(device=item.device, peer=item.peer, bridge=item.bridge,
                       mac_address=item.mac, addresses=item.addresses, gateway=item.gateway)
    return state


def ruleset(request: tasks_pb2.EnsureRouterRequest) -> str:
    """The nft script that replaces the router's table whole, atomically.

    Declaring the table first makes the delete succeed on a node that has
    none yet; the one script is one transaction, so no packet sees a half table.
    """
    table = network_devices.router_table(request.router_id)
    dnat: list[str] = []
    snat: list[str] = []
    if request.HasField("gateway"):
        out = gateway_leg(request.gateway.network_id)
        for floating in sorted(request.floating_ips, key=lambda f: f.floating_ip_address):
            dnat.append(f"ip daddr {floating.floating_ip_address} "
                        f"dnat ip to {floating.fixed_ip_address}")
            # A floating IP's own SNAT comes before the subnets' masquerade.
            snat.append(f"ip saddr {floating.fixed_ip_address} oifname \"{out}\" "
                        f"snat ip to {floating.floating_ip_address}")
        if request.gateway.enable_snat:
            gateway_address = ipaddress.ip_interface(request.gateway.address).ip
            for subnet in _internal_subnets(request):
                snat.append(f"ip saddr {subnet} oifname \"{out}\" snat ip to {gateway_address}")
    lines = [f"table inet {table} {{}}", f"delete table inet {table}", f"table inet {table} {{",
             "  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;",
             *(f"    {rule}" for rule in dnat), "  }",
             "  chain postrouting {",
             "    type nat hook postrouting priority srcnat; policy accept;",
             *(f"    {rule}" for rule in snat), "  }", "}"]
    return "\n".join(lines) + "\n"


# --- from what the node holds to the state ---------------------------------------------------


def node_command(scope: str, *argv: str) -> Step:
    """An `ip` command run in the dataplane's own namespace (the host's when scope is "")."""
    return ("ip", "-n", scope, *argv) if scope else ("ip", *argv)


def steps(current: tasks_pb2.RealizedRouter | None, request: tasks_pb2.EnsureRouterRequest,
          scope: str, mtus: dict[str, int] | None = None) -> list[Step]:
    """The commands that take the node from `current` to the router `request` describes.

    `mtus` gives the MTU of each network's bridge (a new leg gets it; none = the default).
    """
    want = desired(request, scope)
    namespace = want.namespace
    found: list[Step] = []
    if current is None:
        found += [("ip", "netns", "add", namespace), ("ip", "-n", namespace, "link", "set", "lo",
                                                       "up")]
    if current is None or not current.ip_forwarding:
        found.append(("ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1"))
    had_routes = set(current.routes) if current is not None else set()
    # Routes go before the legs they leave by do.
    for route in sorted(had_routes - set(want.routes)):
        found.append(("ip", "-n", namespace, "route", "del", *route.split()))
    leg_steps = _legs_steps(current, request, namespace, scope, mtus or {})
    if any("veth" in step for step in leg_steps):
        had_routes = set()  # a leg made again took its routes with it
    found += leg_steps
    if any(step[3:5] == ("addr", "add") and ":" in step[5] for step in leg_steps):
        # IPv6 is routed, never NATed: forwarding on once the router holds an IPv6 address.
        found.append(("ip", "netns", "exec", namespace, "sysctl", "-qw",
                      "net.ipv6.conf.all.forwarding=1"))
    for route in want.routes:
        if route not in had_routes:
            found.append(("ip", "-n", namespace, "route", "replace", *route.split()))
    if current is None or current.nft_table != want.nft_table \
            or list(current.nat_rules) != list(want.nat_rules):
        found.append((NFT_LOAD, namespace, ruleset(request)))
    return found


def _legs_steps(current: tasks_pb2.RealizedRouter | None,
                request: tasks_pb2.EnsureRouterRequest, namespace: str, scope: str,
                mtus: dict[str, int]) -> list[Step]:
    """Legs the router no longer has removed, then each of its legs made or mended."""
    held = {item.device: item for item in current.legs} if current is not None else {}
    wanted = legs(request)
    found: list[Step] = [("ip", "-n", namespace, "link", "del", device)
                         for device in sorted(set(held) - {item.device for item in wanted})]
    for item in wanted:
        found += _leg_steps(held.get(item.device), item, request.router_id, namespace, scope,
                            mtus.get(item.network_id, 0))
    return found


def _leg_steps(held: tasks_pb2.RealizedRouterLeg | None, item: Leg, router_id: str,
               namespace: str, scope: str, mtu: int) -> list[Step]:
    found: list[Step] = []
    if held is not None and held.bridge != item.bridge:
        # The bridge end is gone or on another bridge: make the leg again whole.
        found.append(("ip", "-n", namespace, "link", "del", item.device))
        held = None
    if held is None:
        sized = ("mtu", str(mtu)) if mtu else ()
        found += [
            node_command(scope, "link", "add", item.peer, *sized, "type", "veth", "peer", "name",
                  item.device, *sized, "netns", namespace),
            ("ip", "-n", namespace, "link", "set", item.device, "address", item.mac,
             "alias", leg_alias(router_id, item.network_id)),
            # The node holds no address on a tenant network, not even a link-local one.
            node_command(scope, "link", "set", item.peer, "addrgenmode", "none"),
            node_command(scope, "link", "set", item.peer, "master", item.bridge, "up"),
            ("ip", "-n", namespace, "link", "set", item.device, "up"),
        ]
        had: set[str] = set()
    else:
        if held.mac_address != item.mac:
            found.append(("ip", "-n", namespace, "link", "set", item.device, "address", item.mac))
        had = set(held.addresses)
    for address in sorted(had - set(item.addresses)):
        found.append(("ip", "-n", namespace, "addr", "del", address, "dev", item.device))
    for address in item.addresses:
        if address not in had:
            found.append(("ip", "-n", namespace, "addr", "add", address, "dev", item.device))
    return found


def remove_steps(current: tasks_pb2.RealizedRouter) -> list[Step]:
    """The commands that remove a router: its legs first (so no veth end outlives the
    namespace's slow teardown), then the namespace with its table."""
    found: list[Step] = [("ip", "-n", current.namespace, "link", "del", item.device)
                         for item in current.legs]
    found.append(("ip", "netns", "del", current.namespace))
    return found
