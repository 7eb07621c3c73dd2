"""Virtual networks of the node as libvirt knows them."""

from __future__ import annotations

from services.agent.driver.connection import Connection


class Networks:
    """The node's libvirt networks through its connection."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def names(self) -> list[str]:
        """Names of every network, running or only defined, sorted."""
        with self._connection.calling("list networks") as conn:
            return sorted({*conn.listNetworks(), *conn.listDefinedNetworks()})
