"""The recording dataplane: what the kernel one would run, kept in memory, nothing run.

Nodes on libvirt's test driver use it, so services drive the same tasks on
every node. It plans with the kernel dataplane's own functions (`plan`)
against what it recorded before, so a repeat records nothing, and the state
and commands it holds are read back through the `network.network_state`
task. The agent process keeps one; a restart forgets it, as a test node's
libvirt does.
"""

from __future__ import annotations

import collections
import threading

from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import base, plan, port_nft, routers

MAX_ACTIONS = 10_000
"""Commands kept; the oldest go first."""


class RecordingDataplane(base.Dataplane):
    kind = base.RECORDING

    def __init__(self, tunnel_address: str, scope: str = "") -> None:
        self._tunnel_address = tunnel_address
        self._scope = scope
        self._lock = threading.Lock()
        self._networks: dict[str, tasks_pb2.RealizedNetwork] = {}
        self._dhcp: dict[str, plan.DhcpConfig] = {}
        self._actions: collections.deque[str] = collections.deque(maxlen=MAX_ACTIONS)
        self.routers = routers.RecordingRouters(scope, carries=self._carries)
        self.ports: port_nft.PortFilters = port_nft.RecordingPortFilters()

    def _carries(self, network_id: str) -> bool:
        with self._lock:
            return network_id in self._networks

    def ensure_network(self, request: tasks_pb2.EnsureNetworkRequest) -> bool:
        config = plan.dhcp_config(request, self._scope)
        want = plan.desired(request, self._tunnel_address, config)
        with self._lock:
            current = self._networks.get(request.network_id)
            running = self._dhcp.get(request.network_id)
            step = plan.dhcp_process_step(running, config)
            steps = plan.link_steps(current, want, self._tunnel_address)
            if step == "stop":
                steps.append(_dnsmasq(step, running))
            steps.extend(plan.dhcp_link_steps(current, want, config, self._scope))
            if step and step != "stop":
                steps.append(_dnsmasq(step, config))
            self._actions.extend(" ".join(s) for s in steps)
            self._networks[request.network_id] = want
            if config is None:
                self._dhcp.pop(request.network_id, None)
            else:
                self._dhcp[request.network_id] = config
            return bool(steps)

    def remove_network(self, network_id: str) -> bool:
        with self._lock:
            current = self._networks.pop(network_id, None)
            running = self._dhcp.pop(network_id, None)
            if current is None:
                return False
            steps: list[plan.Step] = []
            if running is not None:
                steps.append(_dnsmasq("stop", running))
                steps.append(("ip", "netns", "del", running.namespace))
            steps.append(("ip", "link", "del", current.vxlan))
            steps.append(("ip", "link", "del", current.bridge))
            self._actions.extend(" ".join(s) for s in steps)
            return True

    def network_state(self, network_id: str) -> tasks_pb2.RealizedNetwork | None:
        with self._lock:
            current = self._networks.get(network_id)
            return None if current is None else _copy(current)

    def network_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._networks)

    def actions(self) -> list[str]:
        with self._lock:
            return list(self._actions)


def _dnsmasq(step: str, config: plan.DhcpConfig | None) -> plan.Step:
    namespace = config.namespace if config is not None else ""
    return ("dnsmasq", step, namespace)


def _copy(message: tasks_pb2.RealizedNetwork) -> tasks_pb2.RealizedNetwork:
    copy = tasks_pb2.RealizedNetwork()
    copy.CopyFrom(message)
    return copy
