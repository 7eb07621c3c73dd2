"""Network namespaces for dataplane tests: "nodes" and "guests" made and always removed.

Every namespace a `Namespaces` makes carries the test's own random tag, so
two runs (or two engineers) on one machine never meet, and `remove_all`
deletes exactly the namespaces with that tag, whatever the test left behind
(the kernel dataplane's DHCP namespaces are named after its node namespace,
so they carry the tag too). Nothing outside those namespaces is touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from nubis.agent.v1 import tasks_pb2

# Busybox udhcpc calls this with the lease in its environment; it writes the
# lease down and configures the address, as a guest's DHCP client would.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    printf 'ip=%s\\nmask=%s\\nrouter=%s\\ndns=%s\\nmtu=%s\\nserverid=%s\\n' \\
      "$ip" "$mask" "$router" "$dns" "$mtu" "$serverid" > "$LEASE_OUT"
    ;;
esac
exit 0
"""

NEEDS = ("ip", "bridge", "dnsmasq", "busybox")
"""Programs the kernel dataplane tests run."""


def missing_reason() -> str | None:
    """Why the kernel dataplane tests cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "the kernel dataplane needs root (network namespaces, bridges, vxlan)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def ping(namespace: str, address: str, count: int = 1) -> None:
    """Ping `address` from inside `namespace` (busybox's ping); AssertionError if unanswered."""
    run("ip", "netns", "exec", namespace, "busybox", "ping", "-c", str(count), "-W", "2",
        address)


# Accepts one TCP connection and answers the address it came from.
_SERVER = """
import socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1])))
server.listen(1)
print("listening", flush=True)
server.settimeout(20)
connection, peer = server.accept()
connection.sendall(peer[0].encode())
connection.close()
"""
_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as connection:
    print(connection.recv(100).decode())
"""


# Answers every connection with the address it came from, until killed
# (argv: port, then 4 or 6).
ECHO_SERVER = """
import socket, sys
family = socket.AF_INET6 if sys.argv[2:3] == ["6"] else socket.AF_INET
server = socket.socket(family)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(sys.argv[1])))
server.listen(8)
print("listening", flush=True)
while True:
    connection, peer = server.accept()
    connection.sendall(peer[0].encode())
    connection.close()
"""
# Prints what ECHO_SERVER answered, or "refused" (argv: address, port, [source address]).
ECHO_CLIENT = """
import socket, sys
source = (sys.argv[3], 0) if len(sys.argv) > 3 else None
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5,
                                  source_address=source) as connection:
        print(connection.recv(100).decode())
except OSError:
    print("refused")
"""


def echo_server(namespace: str, port: int, family: int = 4) -> subprocess.Popen[str]:
    """ECHO_SERVER listening in `namespace`; the caller kills it."""
    server = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-c",
                               ECHO_SERVER, str(port), str(family)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    return server


def stop_echo_servers(servers: list[subprocess.Popen[str]]) -> None:
    """End the servers `echo_server` started, their pipes closed."""
    for server in servers:
        server.kill()
        server.wait(timeout=5)
        if server.stdout is not None:
            server.stdout.close()


def echo(namespace: str, address: str, port: int, source: str = "") -> str:
    """What a connection from `namespace` gets: the address the server saw, or "refused"."""
    extra = [source] if source else []
    done = run("ip", "netns", "exec", namespace, sys.executable, "-c", ECHO_CLIENT, address,
               str(port), *extra, timeout=15)
    return done.stdout.strip()


def seen_from(server_ns: str, client_ns: str, address: str, port: int) -> str:
    """Connect from `client_ns` to `address`:`port` served in `server_ns`: the source address
    the server saw (what SNAT and floating IPs are judged by)."""
    server = subprocess.Popen(["ip", "netns", "exec", server_ns, sys.executable, "-c", _SERVER,
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        done = run("ip", "netns", "exec", client_ns, sys.executable, "-c", _CLIENT, address,
                   str(port), timeout=15)
        return done.stdout.strip()
    finally:
        server.kill()
        server.wait(timeout=5)


class Namespaces:
    """Makes tagged namespaces and veth pairs; `remove_all` removes every tagged namespace."""

    def __init__(self, workdir: Path) -> None:
        self.tag = f"nt{uuid.uuid4().hex[:6]}"
        self._workdir = workdir
        self._script = workdir / "udhcpc.script"
        self._script.write_text(UDHCPC_SCRIPT)
        self._script.chmod(0o755)
        self._links = 0

    def make(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        run("ip", "netns", "add", name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, left_ns: str, left: str, right_ns: str, right: str,
             mac: str = "") -> None:
        """A veth pair, `left` in `left_ns` and `right` in `right_ns`, both up."""
        extra = ["address", mac] if mac else []
        run("ip", "-n", left_ns, "link", "add", left, *extra, "type", "veth",
            "peer", "name", right, "netns", right_ns)
        run("ip", "-n", left_ns, "link", "set", left, "up")
        run("ip", "-n", right_ns, "link", "set", right, "up")

    def attach_guest(self, node_ns: str, bridge: str, role: str, mac: str) -> str:
        """A "guest" namespace whose eth0 (with `mac`) is a port of `bridge` in `node_ns`."""
        guest = self.make(role)
        self._links += 1
        tap = f"t{self.tag[2:]}-{self._links}"
        self.link(guest, "eth0", node_ns, tap, mac=mac)
        run("ip", "-n", node_ns, "link", "set", tap, "master", bridge)
        return guest

    def dhcp(self, guest: str, timeout: int = 10) -> dict[str, str]:
        """Run a DHCP client in `guest` until it holds a lease; the lease's fields."""
        lease = self._workdir / f"{guest}.lease"
        env = {**os.environ, "LEASE_OUT": str(lease)}
        done = subprocess.run(
            ["ip", "netns", "exec", guest, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n",
             "-t", str(timeout), "-T", "1", "-s", str(self._script)],
            capture_output=True, text=True, timeout=timeout * 2 + 10, env=env, check=False)
        if done.returncode != 0 or not lease.exists():
            raise AssertionError(f"no DHCP lease in {guest}: {done.stdout} {done.stderr}")
        fields = dict(line.split("=", 1) for line in lease.read_text().splitlines() if "=" in line)
        return fields

    def names(self) -> list[str]:
        """Every namespace on the machine carrying this test's tag."""
        shown = run("ip", "netns", "list").stdout.split("\n")
        return sorted(line.split()[0] for line in shown if line and self.tag in line.split()[0])

    def remove_all(self) -> None:
        for name in self.names():
            # Whatever still runs in a namespace of ours (a dnsmasq a failed test left) goes first.
            pids = run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", name, check=False)


def port(port_id: str, mac: str, subnet_id: str, address: str) -> tasks_pb2.DataplanePort:
    return tasks_pb2.DataplanePort(
        id=port_id, mac_address=mac,
        fixed_ips=[tasks_pb2.DataplaneFixedIp(subnet_id=subnet_id, ip_address=address)])


def network_request(network_id: str, vni: int, ports: list[tasks_pb2.DataplanePort],
                    peers: list[str] | None = None, subnet_id: str = "subnet-a",
                    cidr: str = "10.77.0.0/24", gateway: str = "10.77.0.1",
                    dhcp_address: str = "10.77.0.2",
                    mtu: int = 0) -> tasks_pb2.EnsureNetworkRequest:
    return tasks_pb2.EnsureNetworkRequest(
        network_id=network_id, vni=vni, mtu=mtu, vxlan_peers=peers or [], ports=ports,
        subnets=[tasks_pb2.DataplaneSubnet(
            id=subnet_id, cidr=cidr, gateway_ip=gateway, dhcp_enabled=True,
            dhcp_address=dhcp_address, dns_nameservers=["192.0.2.53"])])
