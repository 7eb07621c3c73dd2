"""What a node must hold for a nubis network, as pure functions both dataplanes share.

`check` validates an ensure request, `desired` turns it into the realized
state the node must reach (a `RealizedNetwork`), `dhcp_config` into the
dnsmasq files and arguments, and `link_steps` lists the `ip` / `bridge`
commands that take a node from what it holds to that state. The kernel
dataplane runs those commands; the recording one only records them, so both
converge the same way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from dataclasses import dataclass

from nubis.agent.v1 import tasks_pb2

from services.common import errors, network_devices

DEFAULT_MTU = 1450
"""A VXLAN network's MTU when none is given: 1500 less the 50 bytes of encapsulation."""
VXLAN_PORT = 4789
"""IANA's VXLAN UDP port."""
FLOOD_MAC = "00:00:00:00:00:00"
"""The fdb address whose entries list the peers that get every flooded frame."""
LEASE_TIME = "86400s"
"""How long a guest keeps its address before asking again (Neutron's default)."""
MAX_VNI = 2**24 - 1

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_HOST_NAME = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")

Step = tuple[str, ...]
"""One command: argv of `ip` or `bridge`, run in the dataplane's namespace unless it names one."""


@dataclass(frozen=True)
class DhcpConfig:
    """Everything dnsmasq of one network is started with; a change of `args` restarts it."""

    namespace: str
    interface: str
    args: tuple[str, ...]
    """Options that only a restart changes (ranges, interface), without the file paths."""
    hosts: str
    """Contents of the hosts file, one `mac,ip,hostname` per line (SIGHUP re-reads it)."""
    opts: str
    """Contents of the options file: router, DNS, routes, MTU per subnet (SIGHUP re-reads it)."""
    addresses: tuple[str, ...]
    """Addresses of the server's interface (`ip/prefix`), sorted."""


def check(request: tasks_pb2.EnsureNetworkRequest) -> None:
    """InvalidArgument naming every bad field of an ensure request."""
    bad: list[errors.FieldViolation] = []
    if not _UUID.match(request.network_id):
        bad.append(errors.FieldViolation("network_id", "must be a lower-case UUID"))
    if not 1 <= request.vni <= MAX_VNI:
        bad.append(errors.FieldViolation("vni", f"must be 1..{MAX_VNI}"))
    if request.mtu and not 68 <= request.mtu <= 9000:
        bad.append(errors.FieldViolation("mtu", "must be 0 (the default) or 68..9000"))
    subnets: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
    for i, subnet in enumerate(request.subnets):
        cidr = _check_subnet(subnet, f"subnets[{i}]", bad)
        if cidr is not None:
            subnets[subnet.id] = cidr
    for i, peer in enumerate(request.vxlan_peers):
        if not _is_address(peer):
            bad.append(errors.FieldViolation(f"vxlan_peers[{i}]", "must be an IP address"))
    for i, port in enumerate(request.ports):
        _check_port(port, f"ports[{i}]", subnets, bad)
    if bad:
        raise errors.InvalidArgument("the network cannot be realized as given", violations=bad)


def _check_subnet(subnet: tasks_pb2.DataplaneSubnet, where: str,
                  bad: list[errors.FieldViolation],
                  ) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        cidr = ipaddress.ip_network(subnet.cidr, strict=True)
    except ValueError:
        bad.append(errors.FieldViolation(f"{where}.cidr", "must be a network CIDR"))
        return None
    for name in ("gateway_ip", "dhcp_address"):
        value = getattr(subnet, name)
        if value and not _inside(value, cidr):
            bad.append(errors.FieldViolation(f"{where}.{name}", f"must be inside {cidr}"))
    for j, address in enumerate(subnet.dns_nameservers):
        if not _is_address(address):
            bad.append(errors.FieldViolation(f"{where}.dns_nameservers[{j}]",
                                             "must be an IP address"))
    for j, route in enumerate(subnet.host_routes):
        if not _is_network(route.destination) or not _inside(route.nexthop, cidr):
            bad.append(errors.FieldViolation(
                f"{where}.host_routes[{j}]", f"needs a CIDR and a next hop inside {cidr}"))
    return cidr


def _check_port(port: tasks_pb2.DataplanePort, where: str,
                subnets: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network],
                bad: list[errors.FieldViolation]) -> None:
    if not _MAC.match(port.mac_address):
        bad.append(errors.FieldViolation(f"{where}.mac_address",
                                         "must be aa:bb:cc:dd:ee:ff"))
    for j, fixed in enumerate(port.fixed_ips):
        cidr = subnets.get(fixed.subnet_id)
        if cidr is None or not _inside(fixed.ip_address, cidr):
            bad.append(errors.FieldViolation(
                f"{where}.fixed_ips[{j}]", "must be an address of one of the subnets"))


def mtu(request: tasks_pb2.EnsureNetworkRequest) -> int:
    return request.mtu or DEFAULT_MTU


def desired(request: tasks_pb2.EnsureNetworkRequest, tunnel_address: str,
            config: DhcpConfig | None) -> tasks_pb2.RealizedNetwork:
    """The state the node must hold for the network (peers exclude the node itself)."""
    return tasks_pb2.RealizedNetwork(
        network_id=request.network_id,
        bridge=network_devices.bridge(request.network_id),
        vxlan=network_devices.vxlan(request.network_id),
        vni=request.vni,
        vxlan_local=tunnel_address,
        mtu=mtu(request),
        vxlan_peers=sorted({p for p in request.vxlan_peers if p != tunnel_address}),
        dhcp=config is not None,
        dhcp_hosts=config.hosts.splitlines() if config else [],
        dhcp_addresses=config.addresses if config else [],
        dhcp_namespace=config.namespace if config else "",
    )


def dhcp_config(request: tasks_pb2.EnsureNetworkRequest, scope: str) -> DhcpConfig | None:
    """dnsmasq's arguments and files for the network; None if no subnet serves DHCP.

    `scope` is the dataplane's own namespace ("" for the host's), which names
    the DHCP namespace apart from another dataplane's on the same machine.
    """
    # A subnet the service gave no DHCP address (no pool to take it from) is served by nobody.
    served = [s for s in request.subnets if s.dhcp_enabled and s.dhcp_address]
    if not served:
        return None
    network_id = request.network_id
    interface = network_devices.dhcp_veth_peer(network_id)
    args = [f"--interface={interface}"]
    opts: list[str] = []
    addresses = []
    for subnet in sorted(served, key=lambda s: s.id):
        cidr = ipaddress.ip_network(subnet.cidr)
        tag = _tag(subnet.id)
        addresses.append(f"{subnet.dhcp_address}/{cidr.prefixlen}")
        mask = str(cidr.netmask) if cidr.version == 4 else str(cidr.prefixlen)
        args.append(f"--dhcp-range=set:{tag},{cidr.network_address},static,{mask},{LEASE_TIME}")
        if cidr.version == 4:
            # Forced, as Neutron does: many clients never ask for option 26.
            args.append(f"--dhcp-option-force=tag:{tag},option:mtu,{mtu(request)}")
        opts.extend(_subnet_options(subnet, tag, cidr.version))
    hosts = []
    served_ids = {s.id for s in served}
    for port in sorted(request.ports, key=lambda p: p.mac_address.lower()):
        for fixed in port.fixed_ips:
            if fixed.subnet_id in served_ids:
                hosts.append(_host_line(port, fixed.ip_address))
    return DhcpConfig(
        namespace=network_devices.dhcp_namespace(network_id, scope), interface=interface,
        args=tuple(args), hosts="".join(f"{h}\n" for h in sorted(hosts)),
        opts="".join(f"{o}\n" for o in opts), addresses=tuple(sorted(addresses)),
    )


def link_steps(current: tasks_pb2.RealizedNetwork | None, want: tasks_pb2.RealizedNetwork,
               tunnel_address: str) -> list[Step]:
    """Commands taking the node's bridge, vxlan and flood list from `current` to `want`."""
    bridge, vxlan = want.bridge, want.vxlan
    steps: list[Step] = []
    if current is None or not current.bridge:
        steps.append(("ip", "link", "add", bridge, "type", "bridge", "stp_state", "0"))
        # No IPv6 link-local address: the node must not be reachable from the tenant network.
        steps.append(("ip", "link", "set", bridge, "addrgenmode", "none"))
        # The id travels on the device, so a restarted agent knows whose bridge it is.
        steps.append(("ip", "link", "set", bridge, "alias", alias(want.network_id)))
        current_mtu = 0
    else:
        current_mtu = current.mtu
    if current_mtu != want.mtu:
        steps.append(("ip", "link", "set", bridge, "mtu", str(want.mtu)))
    has_vxlan = current is not None and bool(current.vxlan)
    # A vxlan without its bridge (a run cut short) is made again with it.
    if has_vxlan and current is not None and (
            (current.vni, current.vxlan_local) != (want.vni, want.vxlan_local)
            or not current.bridge):
        steps.append(("ip", "link", "del", vxlan))
        has_vxlan = False
    peers: set[str] = set(current.vxlan_peers) if has_vxlan and current is not None else set()
    if not has_vxlan:
        steps.append(("ip", "link", "add", vxlan, "type", "vxlan", "id", str(want.vni),
                      "local", tunnel_address, "dstport", str(VXLAN_PORT)))
        steps.append(("ip", "link", "set", vxlan, "addrgenmode", "none"))
        steps.append(("ip", "link", "set", vxlan, "mtu", str(want.mtu), "master", bridge))
        steps.append(("ip", "link", "set", vxlan, "up"))
    elif current is not None and current.mtu != want.mtu:
        steps.append(("ip", "link", "set", vxlan, "mtu", str(want.mtu)))
    if current is None or not current.bridge:
        steps.append(("ip", "link", "set", bridge, "up"))
    if not has_vxlan:
        # Before any DHCP server joins the bridge (see dhcp_link_steps).
        steps.append(("bridge", "link", "set", "dev", vxlan, "isolated", "on"))
    for peer in sorted(set(want.vxlan_peers) - peers):
        steps.append(("bridge", "fdb", "append", FLOOD_MAC, "dev", vxlan, "dst", peer))
    for peer in sorted(peers - set(want.vxlan_peers)):
        steps.append(("bridge", "fdb", "del", FLOOD_MAC, "dev", vxlan, "dst", peer))
    return steps


def dhcp_link_steps(current: tasks_pb2.RealizedNetwork | None,
                    want: tasks_pb2.RealizedNetwork, config: DhcpConfig | None,
                    scope: str) -> list[Step]:
    """Commands making (or dropping) the DHCP namespace, its veth pair and its addresses.

    Namespace-scoped commands name the namespace (`ip -n`); the namespace
    itself is made and deleted by name, which is global to the machine. The
    veth's bridge port and the vxlan are both isolated: a node's DHCP server
    answers its own guests only, and never hears or answers another node's
    (each node's server holds the same address on the same segment).
    """
    network_id = want.network_id
    namespace = network_devices.dhcp_namespace(network_id, scope)
    veth, peer = network_devices.dhcp_veth(network_id), network_devices.dhcp_veth_peer(network_id)
    had = set(current.dhcp_addresses) if current is not None else set()
    has_namespace = current is not None and current.dhcp_namespace == namespace
    steps: list[Step] = []
    if config is None:
        if has_namespace:
            steps.append(("ip", "netns", "del", namespace))
        return steps
    if not has_namespace:
        steps.append(("ip", "netns", "add", namespace))
        steps.append(("ip", "link", "add", veth, "mtu", str(want.mtu), "type", "veth",
                      "peer", "name", peer, "mtu", str(want.mtu), "netns", namespace))
        steps.append(("ip", "link", "set", veth, "addrgenmode", "none"))
        steps.append(("ip", "link", "set", veth, "master", want.bridge, "up"))
        steps.append(("bridge", "link", "set", "dev", veth, "isolated", "on"))
        steps.append(("ip", "-n", namespace, "link", "set", "lo", "up"))
        steps.append(("ip", "-n", namespace, "link", "set", peer, "up"))
    elif current is not None and current.mtu != want.mtu:
        steps.append(("ip", "link", "set", veth, "mtu", str(want.mtu)))
        steps.append(("ip", "-n", namespace, "link", "set", peer, "mtu", str(want.mtu)))
    for address in sorted(set(config.addresses) - had):
        steps.append(("ip", "-n", namespace, "addr", "add", address, "dev", peer))
    for address in sorted(had - set(config.addresses)):
        steps.append(("ip", "-n", namespace, "addr", "del", address, "dev", peer))
    return steps


def dhcp_process_step(running: DhcpConfig | None, want: DhcpConfig | None) -> str:
    """What the network's dnsmasq needs: "start", "restart", "reload" (SIGHUP), "stop" or ""."""
    if want is None:
        return "stop" if running is not None else ""
    if running is None:
        return "start"
    if (running.args, running.namespace) != (want.args, want.namespace):
        return "restart"
    if (running.hosts, running.opts) != (want.hosts, want.opts):
        return "reload"
    return ""


def alias(network_id: str) -> str:
    """The interface alias that names the nubis network a bridge belongs to."""
    return f"nubis-network:{network_id}"


def network_of_alias(value: str) -> str:
    """The network id an alias names, or "" if it is not a nubis alias."""
    prefix = "nubis-network:"
    return value[len(prefix):] if value.startswith(prefix) else ""


def _subnet_options(subnet: tasks_pb2.DataplaneSubnet, tag: str, version: int) -> list[str]:
    if version == 6:
        dns = ",".join(f"[{a}]" for a in subnet.dns_nameservers)
        return [f"tag:{tag},option6:dns-server,{dns}"] if dns else []
    options = [f"tag:{tag},option:router,{subnet.gateway_ip}" if subnet.gateway_ip
               else f"tag:{tag},option:router"]
    # No nameservers: the option empty, so clients are told of none (dnsmasq serves no DNS).
    options.append(f"tag:{tag},option:dns-server,{','.join(subnet.dns_nameservers)}"
                   if subnet.dns_nameservers else f"tag:{tag},option:dns-server")
    if subnet.host_routes:
        # A client given classless routes ignores option 3, so the default route goes in too.
        routes = [f"{r.destination},{r.nexthop}" for r in subnet.host_routes]
        if subnet.gateway_ip and not any(r.destination == "0.0.0.0/0" for r in subnet.host_routes):
            routes.append(f"0.0.0.0/0,{subnet.gateway_ip}")
        options.append(f"tag:{tag},option:classless-static-route,{','.join(routes)}")
    return options


def _host_line(port: tasks_pb2.DataplanePort, address: str) -> str:
    ip = ipaddress.ip_address(address)
    # A name that is no DNS label (a port called "web_1") is only a hint: the address names it.
    host_name = port.host_name if _HOST_NAME.match(port.host_name) \
        else "host-" + str(ip).replace(".", "-").replace(":", "-")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{port.mac_address.lower()},{shown},{host_name}"


def _tag(subnet_id: str) -> str:
    return "subnet-" + re.sub(r"[^a-zA-Z0-9-]", "", subnet_id)


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    return True


def _inside(address: str, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in cidr
    except ValueError:
        return False


@dataclass(frozen=True)
class Lease:
    """One IPv4 lease of dnsmasq's lease file."""

    mac: str
    address: str


def host_pairs(hosts: str) -> set[tuple[str, str]]:
    """The (MAC, IPv4 address) pairs of a hosts file's lines (IPv6 entries left out)."""
    pairs = set()
    for line in hosts.splitlines():
        fields = line.split(",")
        if len(fields) >= 2 and not fields[1].startswith("["):
            pairs.add((fields[0].lower(), fields[1]))
    return pairs


def ipv4_leases(text: str) -> list[Lease]:
    """The IPv4 leases of dnsmasq's lease file: `expiry mac address name client-id` lines,
    before the `duid` line that opens the DHCPv6 ones."""
    leases = []
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["duid"]:
            break
        if len(fields) >= 3 and _MAC.fullmatch(fields[1]):
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(fields[2]).version == 4:
                    leases.append(Lease(mac=fields[1].lower(), address=fields[2]))
    return leases


def stale_leases(leases: str, hosts: str) -> list[Lease]:
    """IPv4 leases whose MAC and address the hosts file no longer pairs: a deleted port's (or
    one whose address changed). dnsmasq keeps such a lease for its whole lease time and
    refuses its address to every other MAC meanwhile, so they are released."""
    wanted = host_pairs(hosts)
    return [lease for lease in ipv4_leases(leases) if (lease.mac, lease.address) not in wanted]


def without_stale_leases(leases: str, hosts: str) -> str:
    """The lease file without its stale leases (`stale_leases`), every other line kept."""
    stale = set(stale_leases(leases, hosts))
    kept = [line for line in leases.splitlines()
            if not (stale and set(ipv4_leases(line)) & stale)]
    return "".join(f"{line}\n" for line in kept)
