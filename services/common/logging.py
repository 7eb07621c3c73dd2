"""structlog configuration of every nubis process, with secrets redacted from every line.

`configure_logging(settings)` is called once at process start (run_service does
it). Both structlog loggers and the standard library loggers of third-party
code (grpc, celery, aetcd) go through one processor chain and one handler, so
every line has the same shape (JSON or console) and the same redaction. The
RPC layer binds ``request_id`` and ``method`` with `bind_request` for the
duration of a call, so every line logged while serving it carries them.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, suppress
from typing import Any, TextIO

import structlog

from services.common.settings import Settings

REDACTED = "[redacted]"

# Exact key names whose values are secrets; `*_<name>` keys are secrets too
# (access_token, db_password), but `token_id` is an identifier and is kept.
SECRET_KEYS = frozenset({"password", "token", "authorization", "secret", "private_key"})

# A JWT: three base64url segments, the header always starting with '{"' -> eyJ.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*)?")
# "Bearer <anything>" in free text, whatever the token format.
_BEARER = re.compile(r"(?i)(bearer\s+)(?!\[redacted\])[^\s'\",}\]]+")

# Marks the handler this module installs, so reconfiguring replaces only it.
_HANDLER_NAME = "nubis"


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """True if a field named `key` holds a secret whatever its value.

    Remembered per name: every line asks it of each of its fields, and the
    names are few (the code's own field names).
    """
    lowered = key.lower().replace("-", "_")
    return lowered in SECRET_KEYS or any(lowered.endswith("_" + name) for name in SECRET_KEYS)


def redact_text(text: str) -> str:
    """Replace JWTs and bearer credentials inside free text."""
    # Both patterns need these letters: most values (ids, names, codes) skip the regexes.
    if "eyJ" not in text and "bearer" not in text.lower():
        return text
    return _BEARER.sub(r"\1" + REDACTED, _JWT.sub(REDACTED, text))


def redact_value(value: Any) -> Any:
    """Redact secrets inside a value: strings, mappings, sequences (recursively)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and is_secret_key(k) else redact_value(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        # Metadata arrives as (key, value) pairs: treat a secret key's pair as a field.
        if len(value) == 2 and isinstance(value[0], str) and is_secret_key(value[0]):
            return (value[0], REDACTED)
        return [redact_value(item) for item in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: blank secret fields and JWTs anywhere in the event."""
    for key in list(event_dict):
        if is_secret_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(event_dict[key])
    return event_dict


class _RedactingRenderer:
    """Runs the final renderer, then scrubs JWTs from the whole line.

    Tracebacks and exception text are rendered late, so the key-based
    processor never sees them; this last pass covers them too.
    """

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        return redact_text(str(self._renderer(logger, method, event_dict)))


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]


def configure_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library root logger for this process.

    `stream` defaults to stderr; tests pass a buffer to read the lines back.
    """
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        # Plain tracebacks whether or not rich is installed: service processes keep
        # rich out (services.launch), and a line must not depend on what is installed.
        else structlog.dev.ConsoleRenderer(colors=False,
                                           exception_formatter=structlog.dev.plain_traceback)
    )
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if settings.log_json:
        final.append(structlog.processors.format_exc_info)
    final.append(_RedactingRenderer(renderer))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(), processors=final
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


@contextmanager
def bind_request(**fields: str) -> Iterator[None]:
    """Bind `fields` (request_id, method, ...) to every line logged inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        # A streaming handler may be closed from another context than it
        # started in; its task ends right after, taking the binding along.
        with suppress(ValueError):
            structlog.contextvars.reset_contextvars(**tokens)
