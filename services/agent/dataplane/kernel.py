"""The kernel dataplane: a Linux bridge, a VXLAN and a dnsmasq per nubis network, as root.

It reads what the node holds (`ip -j`, `bridge -j`, the dnsmasq pid file),
plans with `plan` and runs only the difference, so a repeat changes nothing.
Every device and namespace is named by `services.common.network_devices`; a
network's files (dnsmasq's pid, hosts, options, leases and log) live in one
directory under the agent's state dir, removed with the network. With
`netns` set, every device is made inside that network namespace instead of
the host's (tests make "node" namespaces that way).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import base, commands, plan, port_nft, routers
from services.common import errors, network_devices

log = structlog.get_logger(__name__)

STOP_TIMEOUT = 5.0
"""Seconds dnsmasq has to exit after SIGTERM before it is killed."""
_CONFIG = "config.json"


class KernelDataplane(base.Dataplane):
    kind = base.KERNEL

    def __init__(self, tunnel_address: str, state_dir: str, netns: str = "",
                 dnsmasq: str = "dnsmasq", dhcp_release: str = "dhcp_release") -> None:
        self._tunnel_address = tunnel_address
        self._state_dir = state_dir
        self._netns = netns
        self._dnsmasq = dnsmasq
        self._dhcp_release = dhcp_release
        self.routers = routers.KernelRouters(netns)
        self.ports: port_nft.PortFilters = port_nft.KernelPortFilters(netns)
        # Namespaces are made and listed machine-wide; one change at a time keeps reads true.
        self._lock = threading.Lock()

    # --- the interface -----------------------------------------------------------

    def ensure_network(self, request: tasks_pb2.EnsureNetworkRequest) -> bool:
        network_id = request.network_id
        config = plan.dhcp_config(request, self._netns)
        want = plan.desired(request, self._tunnel_address, config)
        with self._lock:
            current = self._read(network_id, repair=True)
            running = self._running_config(network_id)
            step = plan.dhcp_process_step(running, config)
            links = plan.link_steps(current, want, self._tunnel_address)
            self._run_all(links)
            if step == "stop":
                self._stop_dnsmasq(network_id)
            namespace = plan.dhcp_link_steps(current, want, config, self._netns)
            self._run_all(namespace)
            if config is not None:
                self._converge_dnsmasq(network_id, config, step)
            elif os.path.isdir(self._dir(network_id)):
                shutil.rmtree(self._dir(network_id), ignore_errors=True)
        changed = bool(links or namespace or step)
        if changed:
            log.info("network realized", network_id=network_id, commands=len(links + namespace),
                     dhcp=step or "unchanged")
        return changed

    def remove_network(self, network_id: str) -> bool:
        with self._lock:
            changed = self._stop_dnsmasq(network_id)
            links = self._links()
            bridge = links.get(network_devices.bridge(network_id), {})
            # Devices named alike for another network (ids sharing 10 hex digits) are its own.
            if plan.network_of_alias(bridge.get("ifalias", "")) in ("", network_id):
                changed = self._remove_devices(network_id, links) or changed
            if os.path.isdir(self._dir(network_id)):
                shutil.rmtree(self._dir(network_id))
                changed = True
        if changed:
            log.info("network removed", network_id=network_id)
        return changed

    def _remove_devices(self, network_id: str, links: dict[str, dict[str, Any]]) -> bool:
        changed = False
        namespace = network_devices.dhcp_namespace(network_id, self._netns)
        if namespace in self._namespaces():
            self._run(("ip", "netns", "del", namespace))
            changed = True
        for name in (network_devices.vxlan(network_id), network_devices.bridge(network_id)):
            if name in links:
                self._run(("ip", "link", "del", name))
                changed = True
        return changed

    def network_state(self, network_id: str) -> tasks_pb2.RealizedNetwork | None:
        with self._lock:
            return self._read(network_id)

    def network_ids(self) -> list[str]:
        with self._lock:
            ids = {plan.network_of_alias(link.get("ifalias", ""))
                   for link in self._links().values()}
            directory = os.path.join(self._state_dir, "networks")
            if os.path.isdir(directory):
                ids.update(os.listdir(directory))
        return sorted(i for i in ids if i)

    # --- reading the node ----------------------------------------------------------

    def _read(self, network_id: str,
              repair: bool = False) -> tasks_pb2.RealizedNetwork | None:
        """What the node holds of the network; `repair` first drops what a cut-short run left."""
        links, namespaces = self._links(), self._namespaces()
        if repair and self._repair(network_id, links, namespaces):
            links, namespaces = self._links(), self._namespaces()
        bridge = links.get(network_devices.bridge(network_id))
        vxlan = links.get(network_devices.vxlan(network_id))
        namespace = network_devices.dhcp_namespace(network_id, self._netns)
        has_namespace = namespace in namespaces
        pid = self._dnsmasq_pid(network_id)
        if bridge is None and vxlan is None and not has_namespace and pid is None:
            return None
        state = tasks_pb2.RealizedNetwork(network_id=network_id)
        if bridge is not None:
            owner = plan.network_of_alias(bridge.get("ifalias", ""))
            if owner and owner != network_id:
                raise errors.FailedPrecondition(
                    f"bridge {bridge['ifname']} belongs to network {owner}, not {network_id}",
                    reason="nubis.agent.device_name_taken",
                    metadata={"device": bridge["ifname"], "network_id": owner})
            state.bridge = bridge["ifname"]
            state.mtu = int(bridge.get("mtu", 0))
        if vxlan is not None:
            state.vxlan = vxlan["ifname"]
            info = vxlan.get("linkinfo", {}).get("info_data", {})
            state.vni = int(info.get("id", 0))
            state.vxlan_local = str(info.get("local", ""))
            state.vxlan_peers.extend(self._flood_list(state.vxlan))
        if has_namespace:
            state.dhcp_namespace = namespace
            state.dhcp_addresses.extend(self._dhcp_addresses(namespace, network_id) or ())
        if pid is not None:
            state.dhcp = True
            state.dhcp_hosts.extend(self._read_file(network_id, "hosts").splitlines())
        return state

    def _repair(self, network_id: str, links: dict[str, dict[str, Any]],
                namespaces: set[str]) -> bool:
        """Remove the pieces a run cut short left unjoined (True if any), so the plan makes
        them again whole."""
        repaired = False
        bridge = network_devices.bridge(network_id)
        vxlan = links.get(network_devices.vxlan(network_id))
        if vxlan is not None and vxlan.get("master") != bridge:
            self._run(("ip", "link", "del", vxlan["ifname"]))
            repaired = True
        namespace = network_devices.dhcp_namespace(network_id, self._netns)
        if namespace not in namespaces:
            return repaired
        veth = links.get(network_devices.dhcp_veth(network_id))
        # The namespace's own end of the veth goes with the bridge's end.
        if veth is None or veth.get("master") != bridge:
            self._stop_dnsmasq(network_id)
            self._run(("ip", "netns", "del", namespace))
            repaired = True
        return repaired

    def _links(self) -> dict[str, dict[str, Any]]:
        shown = self._json(("ip", "-j", "-d", "link", "show"))
        return {link["ifname"]: link for link in shown if isinstance(link, dict)}

    def _namespaces(self) -> set[str]:
        shown = self._json(("ip", "-j", "netns", "list"))
        return {entry["name"] for entry in shown if isinstance(entry, dict)}

    def _flood_list(self, vxlan: str) -> list[str]:
        shown = self._json(("bridge", "-j", "fdb", "show", "dev", vxlan))
        return sorted({entry["dst"] for entry in shown
                       if entry.get("mac") == plan.FLOOD_MAC and "dst" in entry})

    def _dhcp_addresses(self, namespace: str, network_id: str) -> list[str] | None:
        peer = network_devices.dhcp_veth_peer(network_id)
        try:
            shown = self._json(("ip", "-n", namespace, "-j", "addr", "show", "dev", peer))
        except errors.FailedPrecondition:
            return None
        addresses = []
        for link in shown:
            for info in link.get("addr_info", []):
                if info.get("scope") != "link":
                    addresses.append(f"{info['local']}/{info['prefixlen']}")
        return sorted(addresses)

    # --- dnsmasq -----------------------------------------------------------------

    def _dir(self, network_id: str) -> str:
        return os.path.join(self._state_dir, "networks", network_id)

    def _path(self, network_id: str, name: str) -> str:
        return os.path.join(self._dir(network_id), name)

    def _read_file(self, network_id: str, name: str) -> str:
        try:
            with open(self._path(network_id, name), encoding="utf-8") as file:
                return file.read()
        except FileNotFoundError:
            return ""

    def _write_file(self, network_id: str, name: str, text: str) -> None:
        path = self._path(network_id, name)
        with open(f"{path}.new", "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(f"{path}.new", 0o644)
        os.replace(f"{path}.new", path)

    def _dnsmasq_pid(self, network_id: str) -> int | None:
        """The pid of the network's running dnsmasq (checked against its command line)."""
        pid_file = self._path(network_id, "pid")
        text = self._read_file(network_id, "pid").strip()
        if not text.isdigit():
            return None
        try:
            with open(f"/proc/{text}/cmdline", "rb") as file:
                cmdline = file.read().decode(errors="replace")
        except OSError:
            return None
        # A zombie has no command line; a reused pid has someone else's.
        return int(text) if f"--pid-file={pid_file}" in cmdline else None

    def _running_config(self, network_id: str) -> plan.DhcpConfig | None:
        if self._dnsmasq_pid(network_id) is None:
            return None
        try:
            saved = json.loads(self._read_file(network_id, _CONFIG) or "{}")
        except ValueError:
            saved = {}
        return plan.DhcpConfig(
            namespace=saved.get("namespace", ""), interface=saved.get("interface", ""),
            args=tuple(saved.get("args", ())), hosts=self._read_file(network_id, "hosts"),
            opts=self._read_file(network_id, "opts"),
            addresses=tuple(saved.get("addresses", ())),
        )

    def _converge_dnsmasq(self, network_id: str, config: plan.DhcpConfig, step: str) -> None:
        os.makedirs(self._dir(network_id), mode=0o755, exist_ok=True)
        os.chmod(self._dir(network_id), 0o755)
        self._write_file(network_id, "hosts", config.hosts)
        self._write_file(network_id, "opts", config.opts)
        if step == "reload":
            pid = self._dnsmasq_pid(network_id)
            if pid is not None:
                os.kill(pid, signal.SIGHUP)
                self._release_stale_leases(network_id, config)
                return
            step = "start"
        if step == "restart":
            self._stop_dnsmasq(network_id)
        if step in ("start", "restart"):
            self._prune_stale_leases(network_id, config)
            self._start_dnsmasq(network_id, config)

    def _release_stale_leases(self, network_id: str, config: plan.DhcpConfig) -> None:
        """Release, as its client would, every lease of a MAC and address the hosts file no
        longer pairs (a deleted port's): dnsmasq would refuse that address to the port it is
        given to next until the lease ran out. Neutron's DHCP agent does the same. Without
        dnsmasq-utils' dhcp_release, the lease file is pruned and dnsmasq restarted."""
        stale = plan.stale_leases(self._read_file(network_id, "leases"), config.hosts)
        if not stale:
            return
        if shutil.which(self._dhcp_release) is None:
            self._stop_dnsmasq(network_id)
            self._prune_stale_leases(network_id, config)
            self._start_dnsmasq(network_id, config)
        else:
            for lease in stale:
                self._run(("ip", "netns", "exec", config.namespace, self._dhcp_release,
                           config.interface, lease.address, lease.mac), scoped=False)
        log.info("stale DHCP leases released", network_id=network_id,
                 addresses=[lease.address for lease in stale])

    def _prune_stale_leases(self, network_id: str, config: plan.DhcpConfig) -> None:
        """The lease file without stale leases, for a dnsmasq about to start (it reads the
        file only then)."""
        text = self._read_file(network_id, "leases")
        if plan.stale_leases(text, config.hosts):
            self._write_file(network_id, "leases", plan.without_stale_leases(text, config.hosts))

    def _start_dnsmasq(self, network_id: str, config: plan.DhcpConfig) -> None:
        saved = {"namespace": config.namespace, "interface": config.interface,
                 "args": list(config.args), "addresses": list(config.addresses)}
        self._write_file(network_id, _CONFIG, json.dumps(saved, sort_keys=True))
        leases = self._path(network_id, "leases")
        if not os.path.exists(leases):
            self._write_file(network_id, "leases", "")
        self._run(("ip", "netns", "exec", config.namespace, self._dnsmasq,
                   "--conf-file=/dev/null", "--no-hosts", "--no-resolv", "--port=0",
                   "--bind-interfaces", "--except-interface=lo", "--dhcp-no-override",
                   f"--pid-file={self._path(network_id, 'pid')}",
                   f"--dhcp-hostsfile={self._path(network_id, 'hosts')}",
                   f"--dhcp-optsfile={self._path(network_id, 'opts')}",
                   f"--dhcp-leasefile={leases}",
                   f"--log-facility={self._path(network_id, 'dnsmasq.log')}", "--log-dhcp",
                   *_user_args(self._dir(network_id)), *config.args), scoped=False)

    def _stop_dnsmasq(self, network_id: str) -> bool:
        pid = self._dnsmasq_pid(network_id)
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        stop_by = time.monotonic() + STOP_TIMEOUT
        while self._dnsmasq_pid(network_id) is not None:
            if time.monotonic() > stop_by:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(network_id, "pid"))
        return True

    # --- commands ------------------------------------------------------------------

    def _scoped(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the dataplane's namespace, unless it names a namespace itself."""
        command = list(argv)
        if self._netns and command[0] in ("ip", "bridge") and "-n" not in command[1:3] \
                and command[1:2] != ["netns"]:
            command[1:1] = ["-n", self._netns]
        return command

    def _run_all(self, steps: Sequence[plan.Step]) -> None:
        """Run `steps` in order; neighbours of one program and namespace go as one batch."""
        batch: list[list[str]] = []
        prefix: list[str] = []
        for step in steps:
            command = self._scoped(step)
            head, rest = _batch_split(command)
            if head != prefix or not head:
                self._run_batch(prefix, batch)
                batch, prefix = [], head
            if head:
                batch.append(rest)
            else:
                self._exec(command)
        self._run_batch(prefix, batch)

    def _run_batch(self, prefix: list[str], batch: list[list[str]]) -> None:
        if len(batch) == 1:
            self._exec(prefix + batch[0])
        elif batch:
            # One `ip -batch` instead of a process per command: most of a first ensure's time.
            self._exec([*prefix, "-batch", "-"], "".join(" ".join(line) + "\n" for line in batch))

    def _run(self, argv: Sequence[str], scoped: bool = True) -> str:
        return self._exec(self._scoped(argv) if scoped else list(argv))

    def _exec(self, command: list[str], stdin: str | None = None) -> str:
        return commands.run(command, stdin)

    def _json(self, argv: Sequence[str]) -> list[dict[str, Any]]:
        text = self._run(argv).strip()
        shown = json.loads(text) if text else []
        return shown if isinstance(shown, list) else []


def _batch_split(command: list[str]) -> tuple[list[str], list[str]]:
    """(program and namespace, the rest) of a command `-batch` can run; ([], command) if not.

    Namespace commands (`ip netns add|del`) are left alone: they act on the
    machine's namespace names, not inside a namespace.
    """
    if command[0] not in ("ip", "bridge"):
        return [], command
    head = command[:3] if command[1] == "-n" else command[:1]
    rest = command[len(head):]
    if not rest or rest[0] in ("netns", "-j", "-batch") or any(" " in arg for arg in rest):
        return [], command
    return head, rest


def _user_args(directory: str) -> list[str]:
    """dnsmasq drops root for its own user, who must reach the files it re-reads on SIGHUP.

    When a directory above the network's is closed to others (a state dir
    under a private parent), dnsmasq keeps root instead, and says so once.
    """
    path = os.path.abspath(directory)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            if path not in _WARNED:
                _WARNED.add(path)
                log.warning("dnsmasq keeps root: its files are under a directory others cannot "
                            "search", directory=path)
            return ["--user=root", "--group=root"]
        parent = os.path.dirname(path)
        if parent == path:
            return []
        path = parent


_WARNED: set[str] = set()
