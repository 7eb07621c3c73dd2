"""Secret redaction and the shape of log lines, through the real structlog configuration."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from services.common import logging as nubis_logging
from services.common.settings import Settings

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJib2IifQ.c2lnLW9mLWJvYg"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the previous configuration is restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buffer = io.StringIO()
    nubis_logging.configure_logging(Settings(log_json=True, log_level="debug"), stream=buffer)
    try:
        yield buffer
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.parametrize(
    "key", ["password", "token", "authorization", "secret", "private_key", "access_token",
            "Authorization", "client-secret", "db_password", "original_password"],
)
def test_secret_keys_are_blanked(key: str) -> None:
    assert nubis_logging.is_secret_key(key)


@pytest.mark.parametrize("key", ["token_id", "user_id", "password_policy", "message"])
def test_other_keys_are_kept(key: str) -> None:
    assert not nubis_logging.is_secret_key(key)


def test_jwts_and_bearer_credentials_in_text_are_replaced() -> None:
    assert nubis_logging.redact_text(f"got {JWT} from x") == "got [redacted] from x"
    assert nubis_logging.redact_text("Authorization: Bearer opaque-123") == (
        "Authorization: Bearer [redacted]"
    )
    once = nubis_logging.redact_text(f"bearer {JWT}")
    assert nubis_logging.redact_text(once) == once == "bearer [redacted]"


def test_nested_values_and_metadata_pairs_are_redacted() -> None:
    value = {
        "user": {"name": "bob", "password": "pw"},
        "metadata": [("authorization", "Bearer x"), ("x-request-id", "req-1")],
        "notes": [f"token {JWT}"],
    }
    assert nubis_logging.redact_value(value) == {
        "user": {"name": "bob", "password": "[redacted]"},
        "metadata": [("authorization", "[redacted]"), ["x-request-id", "req-1"]],
        "notes": ["token [redacted]"],
    }


def test_log_lines_are_json_with_request_binding_and_no_secret(captured: io.StringIO) -> None:
    log = structlog.get_logger("test")
    with nubis_logging.bind_request(request_id="req-7", method="/a.B/C"):
        log.info("login", user="bob", password="hunter2", header=f"Bearer {JWT}")
    log.info("after")
    first, second = _lines(captured)
    assert first["event"] == "login" and first["level"] == "info" and first["logger"] == "test"
    assert (first["request_id"], first["method"]) == ("req-7", "/a.B/C")
    assert first["password"] == "[redacted]" and first["header"] == "Bearer [redacted]"
    assert "request_id" not in second
    assert "hunter2" not in captured.getvalue() and JWT not in captured.getvalue()


def test_stdlib_records_and_tracebacks_are_redacted(captured: io.StringIO) -> None:
    logging.getLogger("third.party").warning("token was %s", JWT)
    try:
        raise ValueError(f"bad token {JWT}")
    except ValueError:
        structlog.get_logger("test").exception("failed")
    stdlib, crash = _lines(captured)
    assert (stdlib["event"], stdlib["logger"]) == ("token was [redacted]", "third.party")
    assert "ValueError: bad token [redacted]" in crash["exception"]
    assert JWT.split(".")[2] not in captured.getvalue()


def test_level_filters_lines(captured: io.StringIO) -> None:
    nubis_logging.configure_logging(Settings(log_level="warning"), stream=captured)
    structlog.get_logger("test").info("quiet")
    structlog.get_logger("test").warning("loud")
    assert [line["event"] for line in _lines(captured)] == ["loud"]
