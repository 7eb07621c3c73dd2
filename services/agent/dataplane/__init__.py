"""The node's network dataplane: one interface, a kernel and a recording implementation.

The kernel dataplane makes Linux bridges, VXLAN interfaces and dnsmasq
servers (it runs `ip`, `bridge` and `dnsmasq` as root, never libvirt); the
recording one, for nodes on libvirt's test driver, only records the commands
the kernel one would run, so the same control path runs everywhere. The
agent picks one by its libvirt driver (`choose`) and reports which in its
NodeReport.
"""

from __future__ import annotations

import os

from services.agent.dataplane import kernel, recording
from services.agent.dataplane.base import KERNEL, RECORDING, Dataplane
from services.common.settings import AgentSettings

__all__ = ["KERNEL", "RECORDING", "Dataplane", "choose", "kind_for", "state_dir"]


def kind_for(settings: AgentSettings) -> str:
    """The dataplane a node uses: its setting, else by driver (test → recording, else kernel)."""
    if settings.dataplane:
        return settings.dataplane
    return RECORDING if settings.libvirt_uri.startswith("test:") else KERNEL


DEFAULT_STATE_ROOT = "/var/lib/nubis/agents"
"""Where an agent keeps its files when `agent.state_dir` is empty, one directory per node."""


def state_dir(settings: AgentSettings, node_name: str) -> str:
    """Directory of the agent's own files: the setting, else one per node under /var/lib."""
    return settings.state_dir or os.path.join(DEFAULT_STATE_ROOT, node_name)


def choose(settings: AgentSettings, node_name: str) -> Dataplane:
    """The dataplane of this node, built from the agent's settings."""
    if kind_for(settings) == RECORDING:
        return recording.RecordingDataplane(settings.tunnel_address, settings.dataplane_netns)
    return kernel.KernelDataplane(settings.tunnel_address, state_dir(settings, node_name),
                                  netns=settings.dataplane_netns)
