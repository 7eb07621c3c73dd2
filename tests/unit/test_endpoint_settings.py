"""Settings of where a service listens and what it publishes, and of the service credential."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from services.common import errors
from services.common.settings import ServiceAuthSettings, ServiceEndpoint, Settings


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_is_never_an_advertised_host(wildcard: str) -> None:
    with pytest.raises(ValidationError):
        ServiceEndpoint(host="0.0.0.0", advertise_host=wildcard)
    endpoint = ServiceEndpoint(host=wildcard, port=7504)
    assert endpoint.advertised_address() == f"{socket.gethostname()}:7504"


def test_a_specific_bind_is_advertised_as_it_is() -> None:
    assert ServiceEndpoint(host="10.1.2.3", port=7500).advertised_address() == "10.1.2.3:7500"
    assert ServiceEndpoint(host="fd00::5", port=7500).advertised_address() == "[fd00::5]:7500"
    named = ServiceEndpoint(host="10.1.2.3", port=0, advertise_host="ctl-1.example")
    assert named.advertised_address(7501) == "ctl-1.example:7501"


def test_the_service_password_comes_from_the_setting_or_its_file(tmp_path: Path) -> None:
    assert ServiceAuthSettings().secret() is None
    given = ServiceAuthSettings(password=SecretStr("s3cret-value"))
    assert given.secret() == "s3cret-value"
    assert "s3cret-value" not in repr(Settings(service_auth=given))
    path = tmp_path / "service-password"
    path.write_text("from-the-file\n")
    assert ServiceAuthSettings(password_file=str(path)).secret() == "from-the-file"
    with pytest.raises(errors.FailedPrecondition) as unreadable:
        ServiceAuthSettings(password_file=str(tmp_path / "missing")).secret()
    assert unreadable.value.reason == "nubis.settings.unreadable_password_file"


def test_the_service_password_and_endpoints_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NUBIS_SERVICE_AUTH__PASSWORD", "from-env")
    monkeypatch.setenv("NUBIS_SCHEDULER__ADVERTISE_HOST", "sched-1.example")
    monkeypatch.setenv("NUBIS_IDENTITY__HOST", "0.0.0.0")
    settings = Settings()
    assert settings.service_auth.secret() == "from-env"
    # Setting only the host or advertise_host keeps the service's default ports.
    assert settings.scheduler.advertised_address() == "sched-1.example:7504"
    assert (settings.identity.host, settings.identity.port) == ("0.0.0.0", 7500)
    assert settings.identity.metrics_port == 7600
