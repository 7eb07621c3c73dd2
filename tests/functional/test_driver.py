"""The libvirt driver on the embedded test hypervisor: libvirt failures are UNAVAILABLE."""

from __future__ import annotations

import pytest

from services.agent.driver import Driver
from services.common import errors


def test_domain_names_on_a_broken_connection_is_unavailable() -> None:
    driver = Driver("test:///default")
    assert driver.domain_names() == ["test"]
    # The driver's connection dies under it: libvirt raises on every call.
    driver.connection().close()
    with pytest.raises(errors.Unavailable, match="test:///default"):
        driver.domain_names()
    with pytest.raises(errors.Unavailable, match="test:///default"):
        driver.facts()
    driver.close()
    assert driver.domain_names() == ["test"]


def test_unknown_hypervisor_is_unavailable() -> None:
    driver = Driver("nosuchdriver:///system")
    with pytest.raises(errors.Unavailable, match="cannot open libvirt"):
        driver.domain_names()
