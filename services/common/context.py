"""The per-request context: who is calling, for which project, under which request id.

The server bootstrap builds one `RequestContext` per RPC (after the auth hook
has run) and exposes it through a context variable, so domain code can take
it as an argument from the servicer without threading gRPC objects around.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import NewType

ProjectId = NewType("ProjectId", str)
UserId = NewType("UserId", str)
RequestId = NewType("RequestId", str)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller, as proven by a verified token."""

    user_id: UserId
    user_name: str
    project_id: ProjectId
    roles: frozenset[str] = field(default_factory=frozenset)
    token_id: str = ""
    expires_at: float = 0.0

    def has_role(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class RequestContext:
    """Everything a handler knows about the call besides its request message."""

    request_id: RequestId
    method: str
    principal: Principal | None = None
    peer: str = ""


_current: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "nubis_request_context", default=None
)


def current() -> RequestContext:
    """The context of the RPC being served; raises if called outside one."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("no request context: not inside an RPC handler")
    return ctx


def bind(ctx: RequestContext) -> contextvars.Token[RequestContext | None]:
    """Make `ctx` the current context (the server bootstrap calls this)."""
    return _current.set(ctx)


def unbind(token: contextvars.Token[RequestContext | None]) -> None:
    _current.reset(token)
