"""The node's one libvirt connection, reopened when it dies, and libvirt errors as domain errors.

A libvirt failure that may pass (the daemon restarting, a timeout, a busy
resource) is Unavailable, which agent tasks retry with backoff; a missing
object is NotFound, an existing one AlreadyExists, anything else libvirt
refuses is FailedPrecondition.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import libvirt

from services.common import errors

_TRANSIENT = frozenset({
    libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_OPERATION_TIMEOUT,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_RESOURCE_BUSY,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE, libvirt.VIR_ERR_OPERATION_ABORTED,
})
_MISSING = frozenset({
    libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_POOL, libvirt.VIR_ERR_NO_STORAGE_VOL,
    libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_NWFILTER,
})
_EXISTING = frozenset({
    libvirt.VIR_ERR_DOM_EXIST, libvirt.VIR_ERR_NETWORK_EXIST, libvirt.VIR_ERR_STORAGE_VOL_EXIST,
})


def _ignore(_context: Any, _error: Any) -> None:
    """libvirt's default handler prints every error to stderr; ours are raised and logged."""


libvirt.registerErrorHandler(_ignore, None)


def translate(exc: libvirt.libvirtError, uri: str, what: str) -> errors.NubisError:
    """The domain error for a libvirt failure while doing `what`."""
    code = exc.get_error_code()
    message = f"libvirt at {uri} failed to {what}: {exc}"
    metadata = {"libvirt_uri": uri, "libvirt_code": str(code)}
    if code in _TRANSIENT or exc.get_error_domain() == libvirt.VIR_FROM_RPC:
        return errors.Unavailable(message, reason="nubis.agent.libvirt_unavailable",
                                  metadata=metadata)
    if code in _MISSING:
        return errors.NotFound(message, reason="nubis.agent.libvirt_not_found", metadata=metadata)
    if code in _EXISTING:
        return errors.AlreadyExists(message, reason="nubis.agent.libvirt_exists",
                                    metadata=metadata)
    return errors.FailedPrecondition(message, reason="nubis.agent.libvirt_refused",
                                     metadata=metadata)


class Connection:
    """One libvirt connection shared by every task thread of the agent."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        # libvirt connections are thread-safe, but (re)opening is guarded so
        # two task threads never open two connections at once.
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def get(self) -> libvirt.virConnect:
        """The live connection, reopened if libvirt dropped it."""
        with self._lock:
            if not self._alive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise errors.Unavailable(f"cannot open libvirt at {self.uri}: {exc}",
                                             reason="nubis.agent.libvirt_unavailable",
                                             metadata={"libvirt_uri": self.uri}) from exc
            return self._conn

    def _alive(self) -> bool:
        if self._conn is None:
            return False
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:  # closed under us: an invalid connection pointer
            return False

    @contextlib.contextmanager
    def calling(self, what: str) -> Iterator[libvirt.virConnect]:
        """The connection, with any libvirt failure inside raised as a domain error."""
        conn = self.get()
        try:
            yield conn
        except libvirt.libvirtError as exc:
            raise translate(exc, self.uri, what) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
