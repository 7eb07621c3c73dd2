"""The dataplane's plan (pure) and the recording dataplane that runs it without a kernel.

A request is checked field by field; dnsmasq gets one host line per address
of a served subnet and one range per subnet; the link plan from nothing makes
the bridge, the vxlan and the flood list, and from what it made plans nothing;
the recording dataplane records each command once and forgets a removed
network; the node's dataplane follows its libvirt driver unless set.
"""

from __future__ import annotations

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent import dataplane
from services.agent.dataplane import plan, recording
from services.common import errors, network_devices
from services.common.settings import AgentSettings

NETWORK_ID = "5a0c4d2e-9b1f-4c3a-8d7e-6f5a4b3c2d1e"


def _request(**overrides: object) -> tasks_pb2.EnsureNetworkRequest:
    request = tasks_pb2.EnsureNetworkRequest(
        network_id=NETWORK_ID, vni=5001, vxlan_peers=["10.0.9.1", "10.0.9.2"],
        subnets=[
            tasks_pb2.DataplaneSubnet(
                id="s4", cidr="10.1.0.0/24", gateway_ip="10.1.0.1", dhcp_enabled=True,
                dhcp_address="10.1.0.2", dns_nameservers=["9.9.9.9"],
                host_routes=[tasks_pb2.DataplaneHostRoute(destination="172.16.0.0/16",
                                                          nexthop="10.1.0.254")]),
            tasks_pb2.DataplaneSubnet(id="s6", cidr="fd00:1::/64", dhcp_enabled=True,
                                      dhcp_address="fd00:1::2"),
            tasks_pb2.DataplaneSubnet(id="off", cidr="10.2.0.0/24", dhcp_enabled=False),
        ],
        ports=[tasks_pb2.DataplanePort(
            id="p1", mac_address="fa:16:3e:00:00:01", host_name="web-1",
            fixed_ips=[tasks_pb2.DataplaneFixedIp(subnet_id="s4", ip_address="10.1.0.10"),
                       tasks_pb2.DataplaneFixedIp(subnet_id="s6", ip_address="fd00:1::10"),
                       tasks_pb2.DataplaneFixedIp(subnet_id="off", ip_address="10.2.0.10")])],
    )
    for name, value in overrides.items():
        if isinstance(value, list):
            field = getattr(request, name)
            del field[:]
            field.extend(value)
        else:
            setattr(request, name, value)
    return request


def test_a_bad_request_names_each_bad_field() -> None:
    request = _request(network_id="nope", vni=0, mtu=70000)
    request.subnets[0].gateway_ip = "10.9.9.9"
    request.ports[0].mac_address = "FA-16"
    request.ports[0].fixed_ips[0].ip_address = "10.1.1.1"
    request.vxlan_peers.append("not-an-address")
    with pytest.raises(errors.InvalidArgument) as caught:
        plan.check(request)
    assert {v.field for v in caught.value.violations} == {
        "network_id", "vni", "mtu", "subnets[0].gateway_ip", "ports[0].mac_address",
        "ports[0].fixed_ips[0]", "vxlan_peers[2]",
    }


def test_a_good_request_passes() -> None:
    plan.check(_request())


def test_dnsmasq_serves_exactly_the_assigned_addresses_of_dhcp_subnets() -> None:
    config = plan.dhcp_config(_request(), "")
    assert config is not None
    assert config.hosts.splitlines() == ["fa:16:3e:00:00:01,10.1.0.10,web-1",
                                         "fa:16:3e:00:00:01,[fd00:1::10],web-1"]
    assert config.addresses == ("10.1.0.2/24", "fd00:1::2/64")
    assert "--dhcp-range=set:subnet-s4,10.1.0.0,static,255.255.255.0,86400s" in config.args
    assert "--dhcp-range=set:subnet-s6,fd00:1::,static,64,86400s" in config.args
    assert "--dhcp-option-force=tag:subnet-s4,option:mtu,1450" in config.args
    assert not any("subnet-off" in arg for arg in config.args)
    assert ("tag:subnet-s4,option:classless-static-route,172.16.0.0/16,10.1.0.254,"
            "0.0.0.0/0,10.1.0.1") in config.opts.splitlines()
    assert config.namespace == network_devices.dhcp_namespace(NETWORK_ID)
    assert plan.dhcp_config(_request(), "node-a") is not None


def test_what_the_service_may_send_loosely_is_taken_as_meant() -> None:
    request = _request()
    request.ports[0].mac_address = "FA:16:3E:00:00:01"
    request.ports[0].host_name = "web_1"  # a port name, no DNS label
    request.subnets[1].dhcp_address = ""  # no address for DHCP: that subnet is not served
    plan.check(request)
    config = plan.dhcp_config(request, "")
    assert config is not None
    assert config.hosts.splitlines() == ["fa:16:3e:00:00:01,10.1.0.10,host-10-1-0-10"]
    assert not any("subnet-s6" in arg for arg in config.args)


def test_no_dhcp_subnet_no_dnsmasq() -> None:
    request = _request()
    for subnet in request.subnets:
        subnet.dhcp_enabled = False
    assert plan.dhcp_config(request, "") is None
    assert not plan.desired(request, "10.0.9.1", None).dhcp


def test_the_link_plan_from_nothing_and_from_what_it_made() -> None:
    request = _request()
    config = plan.dhcp_config(request, "")
    want = plan.desired(request, "10.0.9.1", config)
    assert list(want.vxlan_peers) == ["10.0.9.2"]  # the node itself is no peer

    steps = plan.link_steps(None, want, "10.0.9.1")

    bridge, vxlan = network_devices.bridge(NETWORK_ID), network_devices.vxlan(NETWORK_ID)
    assert steps[0] == ("ip", "link", "add", bridge, "type", "bridge", "stp_state", "0")
    assert ("ip", "link", "add", vxlan, "type", "vxlan", "id", "5001", "local", "10.0.9.1",
            "dstport", "4789") in steps
    assert steps[-1] == ("bridge", "fdb", "append", plan.FLOOD_MAC, "dev", vxlan,
                         "dst", "10.0.9.2")
    assert plan.link_steps(want, want, "10.0.9.1") == []
    assert plan.dhcp_link_steps(want, want, config, "") == []


def test_device_names_fit_linux_and_follow_the_network_id() -> None:
    names = [network_devices.bridge(NETWORK_ID), network_devices.vxlan(NETWORK_ID),
             network_devices.dhcp_veth(NETWORK_ID), network_devices.dhcp_veth_peer(NETWORK_ID),
             network_devices.tap(NETWORK_ID)]
    assert all(len(name) <= network_devices.IFNAME_MAX for name in names)
    assert network_devices.bridge(NETWORK_ID) == "nbr-5a0c4d2e9b"
    assert network_devices.router_table(NETWORK_ID) == "nubis_router_5a0c4d2e9b"
    assert network_devices.router_namespace(NETWORK_ID) == f"nrouter-{NETWORK_ID}"


def test_the_recording_dataplane_records_each_change_once() -> None:
    recorder = recording.RecordingDataplane("10.0.9.1")
    assert recorder.ensure_network(_request())
    first = recorder.actions()
    assert any(a.startswith("ip link add nbr-") for a in first)
    assert first[-1].startswith("dnsmasq start")

    assert not recorder.ensure_network(_request())
    assert recorder.actions() == first

    moved = _request(vxlan_peers=["10.0.9.3"])
    moved.ports[0].fixed_ips[0].ip_address = "10.1.0.11"
    assert recorder.ensure_network(moved)
    added = recorder.actions()[len(first):]
    vxlan = network_devices.vxlan(NETWORK_ID)
    assert added == [f"bridge fdb append 00:00:00:00:00:00 dev {vxlan} dst 10.0.9.3",
                     f"bridge fdb del 00:00:00:00:00:00 dev {vxlan} dst 10.0.9.2",
                     f"dnsmasq reload {network_devices.dhcp_namespace(NETWORK_ID)}"]
    state = recorder.network_state(NETWORK_ID)
    assert state is not None and "fa:16:3e:00:00:01,10.1.0.11,web-1" in state.dhcp_hosts
    assert recorder.network_ids() == [NETWORK_ID]

    assert recorder.remove_network(NETWORK_ID)
    assert recorder.network_state(NETWORK_ID) is None
    assert recorder.actions()[-1] == f"ip link del {network_devices.bridge(NETWORK_ID)}"
    assert not recorder.remove_network(NETWORK_ID)


@pytest.mark.parametrize(("uri", "setting", "kind"), [
    ("test:///default", "", dataplane.RECORDING),
    ("qemu:///system", "", dataplane.KERNEL),
    ("test:///default", "kernel", dataplane.KERNEL),
    ("qemu:///system", "recording", dataplane.RECORDING),
])
def test_the_dataplane_follows_the_driver_unless_set(uri: str, setting: str, kind: str) -> None:
    settings = AgentSettings.model_validate({"libvirt_uri": uri, "dataplane": setting})
    assert dataplane.kind_for(settings) == kind
    assert dataplane.choose(settings, "n1").kind == kind


def test_stale_leases_are_those_the_hosts_file_no_longer_pairs() -> None:
    leases = (
        "1796739519 fa:16:3e:04:e4:60 10.0.0.76 guest-a 01:fa:16:3e:04:e4:60\n"
        "1796739519 FA:16:3E:C1:20:DF 10.0.0.25 * 01:fa:16:3e:c1:20:df\n"
        "1796739518 fa:16:3e:ab:ea:83 10.0.0.187 guest-c *\n"
        "duid 00:01:00:01:2c:9a:3b:7c:fa:16:3e:00:00:01\n"
        "1796739518 1234 fd00::5 guest-d 00:01:00:01\n")
    hosts = ("fa:16:3e:04:e4:60,10.0.0.76,guest-a\n"
             "fa:16:3e:c1:20:df,10.0.0.25,host-10-0-0-25\n"
             "fa:16:3e:99:99:99,10.0.0.187,guest-e\n"  # the address went to another MAC
             "fa:16:3e:00:00:01,[fd00::5],guest-d\n")
    assert plan.stale_leases(leases, hosts) == [plan.Lease("fa:16:3e:ab:ea:83", "10.0.0.187")]
    assert plan.stale_leases(leases, "") == [
        plan.Lease("fa:16:3e:04:e4:60", "10.0.0.76"), plan.Lease("fa:16:3e:c1:20:df", "10.0.0.25"),
        plan.Lease("fa:16:3e:ab:ea:83", "10.0.0.187")]
    assert plan.stale_leases("", hosts) == []
    # A pruned file keeps every other line, the DHCPv6 part included.
    pruned = plan.without_stale_leases(leases, hosts)
    assert "fa:16:3e:ab:ea:83" not in pruned
    assert pruned.splitlines() == [line for line in leases.splitlines()
                                   if "fa:16:3e:ab:ea:83" not in line]
