"""The node's routers: a namespace per router with legs, routes and its NAT table.

Two implementations behind one interface, like the networks' dataplane:
`KernelRouters` reads what the node holds (`ip -j`, `nft -j`), plans with
`router_plan` and runs only the difference; `RecordingRouters` keeps the
state and the commands in memory for nodes on libvirt's test driver. Both
refuse a leg into a network the node does not carry (the network's bridge
comes from `network.ensure_network`).
"""

from __future__ import annotations

import abc
import collections
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import commands, router_plan
from services.common import errors, network_devices

log = structlog.get_logger(__name__)

MAX_ACTIONS = 10_000
"""Commands the recording routers keep; the oldest go first."""


class Routers(abc.ABC):
    """What realizes nubis routers on one node; every method converges, none assumes state."""

    kind: str
    """"kernel" or "recording", as the node reports its dataplane."""

    @abc.abstractmethod
    def ensure_router(self, request: tasks_pb2.EnsureRouterRequest) -> bool:
        """Make the node hold exactly the router `request` describes; True if anything changed."""

    @abc.abstractmethod
    def remove_router(self, router_id: str) -> bool:
        """Remove the router's namespace, legs and table; False if there was none."""

    @abc.abstractmethod
    def router_state(self, router_id: str) -> tasks_pb2.RealizedRouter | None:
        """The router as the node holds it now, or None if it holds nothing of it."""

    @abc.abstractmethod
    def router_ids(self) -> list[str]:
        """Ids of every router the node holds, sorted."""


def _missing_networks(request: tasks_pb2.EnsureRouterRequest,
                      carried: Callable[[str], bool]) -> None:
    missing = sorted({leg.network_id for leg in router_plan.legs(request)
                      if not carried(leg.network_id)})
    if missing:
        raise errors.FailedPrecondition(
            f"router {request.router_id} has legs into networks this node does not carry: "
            f"{', '.join(missing)}", reason="nubis.agent.network_not_realized",
            metadata={"router_id": request.router_id, "network_ids": ",".join(missing)})


def _router_of_namespace(name: str, scope: str) -> str:
    prefix = network_devices.router_namespace("", scope)
    return name[len(prefix):] if name.startswith(prefix) else ""


class KernelRouters(Routers):
    """Routers as Linux network namespaces, veth pairs and nftables, run as root."""

    kind = "kernel"

    def __init__(self, scope: str = "") -> None:
        self._scope = scope
        """The dataplane's namespace (bridges live there), "" for the host's."""

    def ensure_router(self, request: tasks_pb2.EnsureRouterRequest) -> bool:
        node_links = self._node_links()
        _missing_networks(request,
                          lambda network_id: network_devices.bridge(network_id) in node_links)
        mtus = {leg.network_id: int(node_links[leg.bridge].get("mtu", 0))
                for leg in router_plan.legs(request)}
        current = self._read(request.router_id, node_links)
        commands = router_plan.steps(current, request, self._scope, mtus)
        for step in commands:
            self._step(step)
        if commands:
            log.info("router realized", router_id=request.router_id, commands=len(commands))
        return bool(commands)

    def remove_router(self, router_id: str) -> bool:
        current = self._read(router_id, self._node_links())
        if current is None:
            return False
        for step in router_plan.remove_steps(current):
            self._step(step)
        log.info("router removed", router_id=router_id)
        return True

    def router_state(self, router_id: str) -> tasks_pb2.RealizedRouter | None:
        return self._read(router_id, self._node_links())

    def router_ids(self) -> list[str]:
        return sorted(filter(None, (_router_of_namespace(name, self._scope)
                                    for name in self._namespaces())))

    # --- reading the node ------------------------------------------------------------

    def _read(self, router_id: str,
              node_links: dict[str, dict[str, Any]]) -> tasks_pb2.RealizedRouter | None:
        namespace = network_devices.router_namespace(router_id, self._scope)
        if namespace not in self._namespaces():
            return None
        state = tasks_pb2.RealizedRouter(router_id=router_id, namespace=namespace)
        addresses = self._addresses(namespace)
        for link in self._json(("ip", "-n", namespace, "-j", "-d", "link", "show")):
            device = link.get("ifname", "")
            if not device.startswith(("qr-", "qg-")):
                continue
            network_id = router_plan.network_of_alias(link.get("ifalias", ""))
            peer = router_plan.leg_peer(router_id, network_id) if network_id else ""
            state.legs.add(device=device, peer=peer,
                           bridge=node_links.get(peer, {}).get("master", ""),
                           mac_address=link.get("address", ""),
                           addresses=addresses.get(device, []), gateway=device.startswith("qg-"))
        state.legs.sort(key=lambda leg: leg.device)
        state.routes.extend(sorted(
            f"{route['dst']} via {route['gateway']}"
            for route in self._json(("ip", "-n", namespace, "-j", "route", "show"))
            if "gateway" in route))
        forwarding = self._run(("ip", "netns", "exec", namespace, "sysctl", "-n",
                                "net.ipv4.ip_forward"))
        state.ip_forwarding = forwarding.strip() == "1"
        table = network_devices.router_table(router_id)
        try:
            shown = self._nft_json(namespace, table)
        except errors.FailedPrecondition:
            shown = None
        if shown is not None:
            state.nft_table = table
            state.nat_rules.extend(sorted(_nat_rules(shown)))
        return state

    def _addresses(self, namespace: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for link in self._json(("ip", "-n", namespace, "-j", "addr", "show")):
            found[link.get("ifname", "")] = sorted(
                f"{info['local']}/{info['prefixlen']}" for info in link.get("addr_info", [])
                if info.get("scope") == "global")
        return found

    def _node_links(self) -> dict[str, dict[str, Any]]:
        shown = self._json(router_plan.node_command(self._scope, "-j", "link", "show"))
        return {link["ifname"]: link for link in shown if "ifname" in link}

    def _namespaces(self) -> set[str]:
        return {entry["name"] for entry in self._json(("ip", "-j", "netns", "list"))
                if "name" in entry}

    def _nft_json(self, namespace: str, table: str) -> list[dict[str, Any]]:
        text = self._run(("ip", "netns", "exec", namespace, "nft", "-j", "list", "table", "inet",
                          table))
        shown = json.loads(text) if text.strip() else {}
        entries = shown.get("nftables", []) if isinstance(shown, dict) else []
        return [entry for entry in entries if isinstance(entry, dict)]

    # --- commands ---------------------------------------------------------------------

    def _step(self, step: router_plan.Step) -> None:
        if step[0] == router_plan.NFT_LOAD:
            self._run(("ip", "netns", "exec", step[1], "nft", "-f", "-"), stdin=step[2])
        else:
            self._run(step)

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        return commands.run(argv, stdin)

    def _json(self, argv: Sequence[str]) -> list[dict[str, Any]]:
        text = self._run(argv).strip()
        shown = json.loads(text) if text else []
        return [entry for entry in shown if isinstance(entry, dict)] \
            if isinstance(shown, list) else []


def _nat_rules(shown: list[dict[str, Any]]) -> list[str]:
    """A table's NAT rules as RealizedRouter.nat_rules writes them."""
    found = []
    for entry in shown:
        rule = entry.get("rule")
        if not isinstance(rule, dict):
            continue
        matched: dict[str, str] = {}
        action: tuple[str, str] | None = None
        for expression in rule.get("expr", []):
            match = expression.get("match")
            if isinstance(match, dict) and "payload" in (match.get("left") or {}):
                right = match.get("right")
                if isinstance(right, dict) and "prefix" in right:
                    right = f"{right['prefix']['addr']}/{right['prefix']['len']}"
                matched[match["left"]["payload"].get("field", "")] = str(right)
            for kind in ("snat", "dnat"):
                if isinstance(expression.get(kind), dict):
                    action = (kind, str(expression[kind].get("addr", "")))
        if action is not None:
            kind, target = action
            found.append(f"{kind} {matched.get('saddr' if kind == 'snat' else 'daddr', '')} "
                         f"to {target}")
    return found


class RecordingRouters(Routers):
    """Routers recorded, not made: the state and the commands the kernel routers would run.

    `carries` says whether the node carries a network (the recording networks'
    dataplane knows); None accepts every network.
    """

    kind = "recording"

    def __init__(self, scope: str = "", carries: Callable[[str], bool] | None = None) -> None:
        self._scope = scope
        self._carries = carries
        self._lock = threading.Lock()
        self._routers: dict[str, tasks_pb2.RealizedRouter] = {}
        self._actions: collections.deque[str] = collections.deque(maxlen=MAX_ACTIONS)

    def ensure_router(self, request: tasks_pb2.EnsureRouterRequest) -> bool:
        if self._carries is not None:
            _missing_networks(request, self._carries)
        with self._lock:
            current = self._routers.get(request.router_id)
            commands = router_plan.steps(current, request, self._scope)
            self._actions.extend(" ".join(step) for step in commands)
            self._routers[request.router_id] = router_plan.desired(request, self._scope)
            return bool(commands)

    def remove_router(self, router_id: str) -> bool:
        with self._lock:
            current = self._routers.pop(router_id, None)
            if current is None:
                return False
            self._actions.extend(" ".join(step) for step in router_plan.remove_steps(current))
            return True

    def router_state(self, router_id: str) -> tasks_pb2.RealizedRouter | None:
        with self._lock:
            current = self._routers.get(router_id)
            if current is None:
                return None
            copy = tasks_pb2.RealizedRouter()
            copy.CopyFrom(current)
            return copy

    def router_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._routers)

    def actions(self) -> list[str]:
        """The commands recorded so far."""
        with self._lock:
            return list(self._actions)
