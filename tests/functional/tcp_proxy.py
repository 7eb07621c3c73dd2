"""A loopback TCP proxy a test can cut and restore: one client's view of an etcd outage.

Everything else keeps reaching etcd directly, so a test can change (and
compact) etcd while the client behind the proxy sees nothing.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.client.lab import daemons


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target_port` until cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = daemons.free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._cuts = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._cuts += 1
        if self._server is not None:
            self._server.close()
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        self._server = None
        await asyncio.sleep(0)  # let the aborted connections' handlers see it

    async def restore(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if cuts != self._cuts:  # accepted just before a cut: it must not survive it
            writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self._transports.update({writer.transport, upstream_writer.transport})
        # Cancelled when the test's loop closes: a handler asyncio reports as failed otherwise.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()
