"""Security groups through the API into a real libvirt's nwfilter driver.

One agent with `agent.port_filter: nwfilter` talks to a private libvirtd (the
test driver has no nwfilter driver), with the recording dataplane (no devices
on the host). A port bound through the network service gets its filter
defined in that libvirt, named in the port's binding details and referenced
by its interface fragment; a rule added to its group through the API is in
the filter libvirt holds, removed again when the rule is deleted; unbinding
undefines it. Runs as root with libvirtd installed; skips otherwise.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.network.v1 import port_pb2, security_group_pb2

from services.client.lab import daemons
from services.common import tasks
from tests.functional import libvirtd
from tests.functional.network import netns
from tests.functional.network.harness import NetCloud, eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

P = security_group_pb2
Rule = P.SecurityGroupRule


@pytest.fixture(scope="module")
def libvirt_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = libvirtd.missing_reason() or netns.missing_reason()
    if reason is not None:
        pytest.skip(reason)
    spaces = netns.Namespaces(tmp_path_factory.mktemp("libvirt-ns"))
    try:
        # The daemon's filters (ebtables, iptables) live in a namespace of the test's own.
        with libvirtd.private_libvirtd(spaces.make("libvirtd")) as uri:
            yield uri
    finally:
        spaces.remove_all()


def defined(uri: str, name: str) -> str | None:
    """The XML of nwfilter `name` as libvirt holds it, or None."""
    conn = libvirt.open(uri)
    try:
        return str(conn.nwfilterLookupByName(name).XMLDesc(0))
    except libvirt.libvirtError:
        return None
    finally:
        conn.close()


def opens(xml: str, port: int) -> bool:
    """Whether a filter's XML (libvirt quotes with either mark) accepts TCP to `port`."""
    return f"dstportstart='{port}'" in xml or f'dstportstart="{port}"' in xml


async def _active(cloud: NetCloud, port_id: str) -> port_pb2.Port | None:
    found = await cloud.api("cloud_admin").GetPort(port_pb2.GetPortRequest(id=port_id))
    return found if found.state == port_pb2.Port.ACTIVE else None


async def test_a_groups_rules_are_the_filter_libvirt_defines_for_the_bound_port(
        cloud: NetCloud, libvirt_uri: str, tmp_path: Path) -> None:
    name = f"e-virt-{uuid.uuid4().hex[:4]}"
    agent: daemons.Daemon = cloud.agents.start(name, {
        "NUBIS_AGENT__LIBVIRT_URI": libvirt_uri, "NUBIS_AGENT__DATAPLANE": "recording",
        "NUBIS_AGENT__PORT_FILTER": "nwfilter",
        "NUBIS_AGENT__STATE_DIR": str(tmp_path / name)})
    try:
        await cloud.wait_node(name)
        api = cloud.api()
        net = await cloud.make_network()
        await cloud.make_subnet(net.meta.id, "10.92.0.0/24", dhcp_enabled=True)
        group = await api.CreateSecurityGroup(P.CreateSecurityGroupRequest(
            security_group=P.SecurityGroup(meta=resource_pb2.ResourceMeta(name="e-virt-web"))))
        port = await cloud.make_port(net.meta.id, security_group_ids=[group.meta.id])
        await cloud.api("cloud_admin").BindPort(port_pb2.BindPortRequest(
            id=port.meta.id, node=name, device_id=str(uuid.uuid4())))
        bound = await eventually(functools.partial(_active, cloud, port.meta.id), within=30)
        filter_name = f"nubis-port-{port.meta.id}"

        async def named() -> port_pb2.Port | None:
            found = await _active(cloud, port.meta.id)
            return found if found and "port_filter" in found.binding_details else None

        bound = await eventually(named, within=15)
        assert bound.binding_details["port_filter"] == filter_name
        held = defined(libvirt_uri, filter_name)
        assert held is not None and not opens(held, 8443)
        answer = await cloud.ask(name, tasks.PORT_FILTER_STATE,
                                 tasks_pb2.PortFilterStateRequest(port_id=port.meta.id))
        assert not answer.recorded and filter_name in answer.filter_names
        # What compute puts in the domain's <interface> references that filter.
        assert filter_name in bound.binding_details["filterref_xml"]
        assert "<filterref" in bound.binding_details["filterref_xml"]

        rule = await api.CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
            security_group_rule=Rule(security_group_id=group.meta.id, protocol="tcp",
                                     direction=Rule.DIRECTION_INGRESS, port_range_min=8443,
                                     port_range_max=8443)))
        held = defined(libvirt_uri, filter_name)
        assert held is not None and opens(held, 8443)
        await api.DeleteSecurityGroupRule(P.DeleteSecurityGroupRuleRequest(id=rule.meta.id))
        held = defined(libvirt_uri, filter_name)
        assert held is not None and not opens(held, 8443)

        await cloud.api("cloud_admin").UnbindPort(port_pb2.UnbindPortRequest(id=port.meta.id))
        assert defined(libvirt_uri, filter_name) is None
        await api.DeletePort(port_pb2.DeletePortRequest(id=port.meta.id))
    finally:
        agent.stop()
