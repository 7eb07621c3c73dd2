"""The libvirt driver on the embedded test hypervisor: libvirt failures as domain errors.

A failure that may pass (a dead connection, no daemon) is UNAVAILABLE, which
tasks retry; a missing object is NOT_FOUND. A connection that died under the
driver is reopened by the next call.
"""

from __future__ import annotations

import uuid

import pytest

from services.agent.driver import Driver
from services.common import errors


def test_a_dead_connection_is_unavailable_and_reopened() -> None:
    driver = Driver("test:///default")
    assert driver.domain_names() == ["test"]
    with (pytest.raises(errors.Unavailable, match="test:///default") as caught,
          driver.connection.calling("list domains") as conn):
        conn.close()  # the connection dies under a call
        conn.listAllDomains(0)
    assert caught.value.reason == "nubis.agent.libvirt_unavailable"
    assert driver.domain_names() == ["test"]
    assert driver.facts().vcpus == 16
    driver.close()


def test_unknown_hypervisor_is_unavailable() -> None:
    driver = Driver("nosuchdriver:///system")
    with pytest.raises(errors.Unavailable, match="cannot open libvirt"):
        driver.domain_names()


def test_a_missing_domain_is_not_found() -> None:
    driver = Driver("test:///default")
    try:
        assert driver.domains.status("test").state == "running"
        with pytest.raises(errors.NotFound, match="nope") as caught:
            driver.domains.status("nope")
        assert caught.value.reason == "nubis.agent.libvirt_not_found"
    finally:
        driver.close()


def test_node_disk_follows_its_pool() -> None:
    """A stopped pool offers no disk; started again, its capacity is back (read fresh)."""
    name = f"pool-{uuid.uuid4().hex[:6]}"
    driver = Driver("test:///default", storage_pool=name, storage_pool_path=f"/{name}")
    try:
        assert driver.facts().disk_gb == 100  # defined on first use; the test driver's size
        driver.connection.get().storagePoolLookupByName(name).destroy()
        assert driver.facts().disk_gb == 0
        driver.storage.start_pool(name)
        assert driver.facts().disk_gb == 100
    finally:
        pool = driver.connection.get().storagePoolLookupByName(name)
        pool.destroy()
        pool.undefine()
        driver.close()
