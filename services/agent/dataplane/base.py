"""The dataplane interface: what realizes nubis networks on one node."""

from __future__ import annotations

import abc

from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import port_nft
from services.agent.dataplane import routers as routers_module

KERNEL = "kernel"
RECORDING = "recording"


class Dataplane(abc.ABC):
    """What realizes nubis networks on one node; every method converges, none assumes state."""

    kind: str
    """"kernel" or "recording", as the node reports it."""
    routers: routers_module.Routers
    """The node's routers (namespaces with NAT), of the same kind and namespace scope."""
    ports: port_nft.PortFilters
    """The ports' security-group and anti-spoofing chains, in the bridges' namespace."""

    @abc.abstractmethod
    def ensure_network(self, request: tasks_pb2.EnsureNetworkRequest) -> bool:
        """Make the node hold exactly the network `request` describes; True if anything changed."""

    @abc.abstractmethod
    def remove_network(self, network_id: str) -> bool:
        """Remove every device, process and file of the network; False if there was none."""

    @abc.abstractmethod
    def network_state(self, network_id: str) -> tasks_pb2.RealizedNetwork | None:
        """The network as the node holds it now, or None if it holds nothing of it."""

    @abc.abstractmethod
    def network_ids(self) -> list[str]:
        """Ids of every network the node holds something of, sorted."""

    def actions(self) -> list[str]:
        """The commands recorded so far (the recording dataplane only)."""
        return []
