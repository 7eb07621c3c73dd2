"""The kernel dataplane in network namespaces made as if they were nodes and guests.

Each "node" is a namespace the dataplane runs in (agent setting
dataplane_netns); each "guest" is a namespace whose eth0 is a port of the
network's bridge, with the MAC nubis gave its port. A guest's DHCP client
gets exactly the address nubis assigned, from the node's dnsmasq; two nodes
joined by a veth pair (their tunnel addresses on it) carry the network over
VXLAN, so guests on different nodes ping each other; an ensure repeated
changes nothing, a changed one converges (peers, hosts reloaded without a
restart); a removed network leaves no bridge, vxlan, namespace, dnsmasq or
file. Runs as root (CI does); skips otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.dataplane import kernel, recording
from services.common import errors, network_devices
from tests.functional.network import netns
from tests.functional.network.netns import network_request, port

pytestmark = [
    pytest.mark.skipif(netns.missing_reason() is not None,
                       reason=netns.missing_reason() or ""),
    pytest.mark.timeout(90),
]

SUBNET = "subnet-a"


@pytest.fixture
def spaces(tmp_path: Path) -> Iterator[netns.Namespaces]:
    made = netns.Namespaces(tmp_path)
    try:
        yield made
    finally:
        made.remove_all()


def _network_id() -> str:
    return str(uuid.uuid4())


def _links(namespace: str) -> set[str]:
    shown = netns.run("ip", "-n", namespace, "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in shown.splitlines()}


def _dataplane(namespace: str, state: Path, tunnel: str = "127.0.0.1") -> kernel.KernelDataplane:
    return kernel.KernelDataplane(tunnel, str(state), netns=namespace)


def test_a_guest_gets_its_nubis_address_from_dnsmasq(spaces: netns.Namespaces,
                                                      tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    mac = "fa:16:3e:10:00:05"
    request = network_request(network_id, 7001, [port("p1", mac, SUBNET, "10.77.0.57")],
                              mtu=1400)
    assert dataplane.ensure_network(request)
    guest = spaces.attach_guest(node, network_devices.bridge(network_id), "guest", mac)

    lease = spaces.dhcp(guest)

    assert lease["ip"] == "10.77.0.57" and lease["mask"] == "24"
    assert lease["router"] == "10.77.0.1" and lease["dns"].strip() == "192.0.2.53"
    assert lease["serverid"] == "10.77.0.2" and lease["mtu"] == "1400"
    netns.ping(guest, "10.77.0.2")


def test_a_guest_of_a_port_added_later_gets_its_address_without_a_restart(
        spaces: netns.Namespaces, tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    first = port("p1", "fa:16:3e:10:01:01", SUBNET, "10.77.0.11")
    dataplane.ensure_network(network_request(network_id, 7002, [first]))
    state = tmp_path / "state" / "networks" / network_id
    pid = (state / "pid").read_text().strip()
    second = port("p2", "fa:16:3e:10:01:02", SUBNET, "10.77.0.12")

    assert dataplane.ensure_network(network_request(network_id, 7002, [first, second]))

    assert (state / "pid").read_text().strip() == pid  # reloaded (SIGHUP), not restarted
    guest = spaces.attach_guest(node, network_devices.bridge(network_id), "guest",
                                second.mac_address)
    assert spaces.dhcp(guest)["ip"] == "10.77.0.12"


def test_dnsmasq_without_root_serves_and_reloads(spaces: netns.Namespaces) -> None:
    # A state dir every user can reach: dnsmasq drops root, as on a node.
    state = Path(tempfile.mkdtemp(prefix="nubis-dataplane-test-"))
    try:
        state.chmod(0o755)
        node = spaces.make("node")
        dataplane = _dataplane(node, state)
        network_id = _network_id()
        first = port("p1", "fa:16:3e:10:03:01", SUBNET, "10.77.0.71")
        dataplane.ensure_network(network_request(network_id, 7010, [first]))
        pid = (state / "networks" / network_id / "pid").read_text().strip()
        assert os.stat(f"/proc/{pid}").st_uid != 0
        second = port("p2", "fa:16:3e:10:03:02", SUBNET, "10.77.0.72")
        dataplane.ensure_network(network_request(network_id, 7010, [first, second]))
        guest = spaces.attach_guest(node, network_devices.bridge(network_id), "guest",
                                    second.mac_address)
        assert spaces.dhcp(guest)["ip"] == "10.77.0.72"
        assert dataplane.remove_network(network_id)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_subnet_without_nameservers_tells_its_guests_of_none(spaces: netns.Namespaces,
                                                                tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    mac = "fa:16:3e:10:05:01"
    request = network_request(network_id, 7013, [port("p1", mac, SUBNET, "10.77.0.41")])
    del request.subnets[0].dns_nameservers[:]
    dataplane.ensure_network(request)

    lease = spaces.dhcp(spaces.attach_guest(node, network_devices.bridge(network_id), "guest",
                                            mac))

    assert lease["ip"] == "10.77.0.41" and lease["dns"].strip() == ""
    log = (tmp_path / "state" / "networks" / network_id / "dnsmasq.log").read_text()
    assert "bad" not in log, log  # every option line of the file was taken


def test_an_unknown_mac_gets_no_address(spaces: netns.Namespaces, tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    dataplane.ensure_network(network_request(
        network_id, 7003, [port("p1", "fa:16:3e:10:02:01", SUBNET, "10.77.0.21")]))
    stranger = spaces.attach_guest(node, network_devices.bridge(network_id), "guest",
                                   "fa:16:3e:10:02:99")
    with pytest.raises(AssertionError, match="no DHCP lease"):
        spaces.dhcp(stranger, timeout=3)


@pytest.mark.parametrize("release", ["dhcp_release", "no-such-dhcp-release"],
                         ids=["released", "pruned-and-restarted"])
def test_an_address_a_deleted_port_held_is_served_to_the_port_it_goes_to_next(
        spaces: netns.Namespaces, tmp_path: Path, release: str) -> None:
    # dnsmasq keeps a lease for a day and refuses its address to any other MAC meanwhile;
    # the address of a deleted port is given to the next port that asks the pool.
    if shutil.which(release) is None and release == "dhcp_release":
        pytest.fail("dnsmasq-utils' dhcp_release is not installed (scripts/setup.sh does)")
    node = spaces.make("node")
    dataplane = kernel.KernelDataplane("127.0.0.1", str(tmp_path / "state"), netns=node,
                                       dhcp_release=release)
    network_id = _network_id()
    bridge = network_devices.bridge(network_id)
    old = port("p1", "fa:16:3e:10:04:01", SUBNET, "10.77.0.31")
    kept = port("p2", "fa:16:3e:10:04:02", SUBNET, "10.77.0.32")
    dataplane.ensure_network(network_request(network_id, 7012, [old, kept]))
    assert spaces.dhcp(spaces.attach_guest(node, bridge, "old", old.mac_address))["ip"] \
        == "10.77.0.31"
    assert spaces.dhcp(spaces.attach_guest(node, bridge, "kept", kept.mac_address))["ip"] \
        == "10.77.0.32"
    leases = tmp_path / "state" / "networks" / network_id / "leases"
    assert old.mac_address in leases.read_text()

    # One realization: the old port gone and its address on a new port with another MAC.
    new = port("p3", "fa:16:3e:10:04:03", SUBNET, "10.77.0.31")
    assert dataplane.ensure_network(network_request(network_id, 7012, [kept, new]))

    assert spaces.dhcp(spaces.attach_guest(node, bridge, "new", new.mac_address))["ip"] \
        == "10.77.0.31"
    held = leases.read_text()
    assert old.mac_address not in held and kept.mac_address in held  # a live lease stays


def test_vxlan_joins_guests_on_two_nodes(spaces: netns.Namespaces, tmp_path: Path) -> None:
    node_a, node_b = spaces.make("node-a"), spaces.make("node-b")
    # The underlay: one link between the two nodes, each tunnel address on its end.
    spaces.link(node_a, "underlay", node_b, "underlay")
    netns.run("ip", "-n", node_a, "addr", "add", "192.168.77.1/24", "dev", "underlay")
    netns.run("ip", "-n", node_b, "addr", "add", "192.168.77.2/24", "dev", "underlay")
    network_id = _network_id()
    mac_a, mac_b = "fa:16:3e:20:00:0a", "fa:16:3e:20:00:0b"
    on_a = port("pa", mac_a, SUBNET, "10.77.0.31")
    on_b = port("pb", mac_b, SUBNET, "10.77.0.32")
    peers = ["192.168.77.1", "192.168.77.2"]  # every node having it; a node skips itself
    plane_a = _dataplane(node_a, tmp_path / "a", tunnel="192.168.77.1")
    plane_b = _dataplane(node_b, tmp_path / "b", tunnel="192.168.77.2")
    plane_a.ensure_network(network_request(network_id, 7004, [on_a], peers=peers))
    plane_b.ensure_network(network_request(network_id, 7004, [on_b], peers=peers))
    bridge = network_devices.bridge(network_id)
    guest_a = spaces.attach_guest(node_a, bridge, "guest-a", mac_a)
    guest_b = spaces.attach_guest(node_b, bridge, "guest-b", mac_b)

    # Each node's DHCP server answers its own guests only (its ports are isolated from the tunnel).
    assert spaces.dhcp(guest_a)["ip"] == "10.77.0.31"
    assert spaces.dhcp(guest_b)["ip"] == "10.77.0.32"

    netns.ping(guest_a, "10.77.0.32", count=3)
    netns.ping(guest_b, "10.77.0.31", count=3)
    state = plane_a.network_state(network_id)
    assert state is not None and list(state.vxlan_peers) == ["192.168.77.2"]
    assert state.vni == 7004 and state.mtu == 1450


def test_ensure_twice_changes_nothing_and_a_change_converges(spaces: netns.Namespaces,
                                                             tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state", tunnel="192.0.2.1")
    network_id = _network_id()
    ports = [port("p1", "fa:16:3e:30:00:01", SUBNET, "10.77.0.41")]
    request = network_request(network_id, 7005, ports, peers=["192.0.2.7", "192.0.2.8"])
    assert dataplane.ensure_network(request)
    first = dataplane.network_state(network_id)

    assert not dataplane.ensure_network(request)
    assert dataplane.network_state(network_id) == first
    # A restarted agent (a new dataplane over the same node and state dir) finds it all done.
    restarted = _dataplane(node, tmp_path / "state", tunnel="192.0.2.1")
    assert not restarted.ensure_network(request)
    assert first is not None and list(first.vxlan_peers) == ["192.0.2.7", "192.0.2.8"]
    assert list(first.dhcp_hosts) == ["fa:16:3e:30:00:01,10.77.0.41,host-10-77-0-41"]

    changed = network_request(network_id, 7006, ports, peers=["192.0.2.8", "192.0.2.9"],
                              mtu=1300)
    assert dataplane.ensure_network(changed)
    after = dataplane.network_state(network_id)
    assert after is not None
    assert (after.vni, after.mtu, list(after.vxlan_peers)) == (7006, 1300,
                                                              ["192.0.2.8", "192.0.2.9"])
    assert not dataplane.ensure_network(changed)
    assert dataplane.network_ids() == [network_id]
    # The node's tunnel address changed (agent restarted with another): the vxlan follows.
    moved = _dataplane(node, tmp_path / "state", tunnel="192.0.2.2")
    assert moved.ensure_network(changed)
    state = moved.network_state(network_id)
    assert state is not None and state.vxlan_local == "192.0.2.2"
    assert not moved.ensure_network(changed)


def test_what_a_cut_short_run_left_is_made_whole(spaces: netns.Namespaces,
                                                 tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    mac = "fa:16:3e:30:01:01"
    request = network_request(network_id, 7011, [port("p1", mac, SUBNET, "10.77.0.81")],
                              peers=["192.0.2.7"])
    dataplane.ensure_network(request)
    whole = dataplane.network_state(network_id)
    # As if a run had stopped between its commands: a vxlan out of its bridge, no DHCP veth.
    netns.run("ip", "-n", node, "link", "set", network_devices.vxlan(network_id), "nomaster")
    netns.run("ip", "-n", node, "link", "del", network_devices.dhcp_veth(network_id))

    assert dataplane.ensure_network(request)

    assert dataplane.network_state(network_id) == whole
    guest = spaces.attach_guest(node, network_devices.bridge(network_id), "guest", mac)
    assert spaces.dhcp(guest)["ip"] == "10.77.0.81"


def test_the_recording_dataplane_holds_what_the_kernel_reads_back(
        spaces: netns.Namespaces, tmp_path: Path) -> None:
    node = spaces.make("node")
    kernel_plane = _dataplane(node, tmp_path / "state", tunnel="192.0.2.1")
    recorder = recording.RecordingDataplane("192.0.2.1", node)
    network_id = _network_id()
    ports = [port("p1", "fa:16:3e:30:02:01", SUBNET, "10.77.0.101")]
    steps = [network_request(network_id, 7014, ports, peers=["192.0.2.7"]),
             network_request(network_id, 7014, [*ports, port("p2", "fa:16:3e:30:02:02", SUBNET,
                                                            "10.77.0.102")],
                             peers=["192.0.2.8"], mtu=1400),
             network_request(network_id, 7015, [], peers=[])]
    for request in steps:
        assert kernel_plane.ensure_network(request) == recorder.ensure_network(request)
        assert kernel_plane.network_state(network_id) == recorder.network_state(network_id)
    assert kernel_plane.remove_network(network_id) == recorder.remove_network(network_id)
    assert kernel_plane.network_state(network_id) is recorder.network_state(network_id) is None


def test_removal_leaves_nothing_of_the_network(spaces: netns.Namespaces,
                                               tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id, other_id = _network_id(), _network_id()
    dataplane.ensure_network(network_request(
        network_id, 7007, [port("p1", "fa:16:3e:40:00:01", SUBNET, "10.77.0.51")]))
    dataplane.ensure_network(network_request(
        other_id, 7008, [port("p2", "fa:16:3e:40:00:02", SUBNET, "10.77.0.52")]))
    files = tmp_path / "state" / "networks" / network_id
    pid = int((files / "pid").read_text())
    dhcp_namespace = network_devices.dhcp_namespace(network_id, node)

    assert dataplane.remove_network(network_id)

    links = _links(node)
    assert network_devices.bridge(network_id) not in links
    assert network_devices.vxlan(network_id) not in links
    assert network_devices.dhcp_veth(network_id) not in links
    assert dhcp_namespace not in spaces.names()
    assert not files.exists()
    assert not _alive(pid)
    assert dataplane.network_state(network_id) is None
    assert not dataplane.remove_network(network_id)  # nothing there is done
    # The other network is untouched.
    assert network_devices.bridge(other_id) in links
    assert dataplane.network_ids() == [other_id]
    assert dataplane.remove_network(other_id)
    assert spaces.names() == [node]


def test_a_network_whose_device_names_are_taken_is_refused_and_harms_nothing(
        spaces: netns.Namespaces, tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    # Two ids alike in their first 10 hex digits name the same devices.
    first, second = "0a1b2c3d-4e00-4000-8000-000000000001", "0a1b2c3d-4eff-4fff-8fff-000000000002"
    request = network_request(first, 7012, [port("p1", "fa:16:3e:40:01:01", SUBNET,
                                                 "10.77.0.91")])
    dataplane.ensure_network(request)
    whole = dataplane.network_state(first)

    with pytest.raises(errors.FailedPrecondition) as caught:
        dataplane.ensure_network(network_request(second, 7013, []))
    assert caught.value.reason == "nubis.agent.device_name_taken"
    assert not dataplane.remove_network(second)
    assert dataplane.network_state(first) == whole


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_dataplane_stays_in_its_node_namespace_holding_no_address(
        spaces: netns.Namespaces, tmp_path: Path) -> None:
    node = spaces.make("node")
    dataplane = _dataplane(node, tmp_path / "state")
    network_id = _network_id()
    dataplane.ensure_network(network_request(
        network_id, 7009, [port("p1", "fa:16:3e:50:00:01", SUBNET, "10.77.0.61")]))
    short = network_devices.short_id(network_id)
    host = netns.run("ip", "-o", "link", "show").stdout
    assert short not in host
    assert network_devices.bridge(network_id) in _links(node)
    # The node holds no address on the tenant network, not even an IPv6 link-local one.
    for device in (network_devices.bridge(network_id), network_devices.vxlan(network_id),
                   network_devices.dhcp_veth(network_id)):
        assert netns.run("ip", "-n", node, "addr", "show", "dev", device).stdout.count(
            "inet") == 0
