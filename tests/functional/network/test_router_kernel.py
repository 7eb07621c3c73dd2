"""Routers on the kernel dataplane, in network namespaces made as if they were a node,
guests and an external network.

The "node" namespace is where the dataplane runs (agent setting
dataplane_netns): it holds an internal and an external network's bridges,
made by network.ensure_network. Two guests are ports of the internal
bridge; the "external" namespace is a port of the external bridge and knows
no route to the internal subnet, so only NAT gets answers back. The router
comes from the network.ensure_router task (run through the agent's phases),
so a guest reaching the external side is seen from the router's gateway
address (SNAT), a guest with a floating IP is seen from it and reached
through it (DNAT). Repeats converge, removal leaves nothing. Runs as root
(CI does); skips otherwise.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import kernel, router_plan
from services.agent.tasks import phases, routing
from services.common import errors, network_devices, tasks
from tests.functional.network import netns

pytestmark = [
    pytest.mark.skipif(netns.missing_reason() is not None,
                       reason=netns.missing_reason() or ""),
    pytest.mark.timeout(90),
]

INTERNAL_CIDR = "10.88.0.0/24"
EXTERNAL_PREFIX = "203.0.113"
GATEWAY = f"{EXTERNAL_PREFIX}.5"
FLOATING = f"{EXTERNAL_PREFIX}.10"
UPSTREAM = f"{EXTERNAL_PREFIX}.1"
GUEST_WITH_FLOATING = "10.88.0.5"
GUEST_WITHOUT = "10.88.0.6"

@pytest.fixture
def spaces(tmp_path: Path) -> Iterator[netns.Namespaces]:
    made = netns.Namespaces(tmp_path)
    try:
        yield made
    finally:
        made.remove_all()


class Site:
    """A node namespace with an internal and an external network, and the router task."""

    def __init__(self, spaces: netns.Namespaces, state: Path) -> None:
        self.spaces = spaces
        self.node = spaces.make("node")
        self.dataplane = kernel.KernelDataplane("127.0.0.1", str(state), netns=self.node)
        self.internal = str(uuid.uuid4())
        self.external = str(uuid.uuid4())
        self.router_id = str(uuid.uuid4())
        for network_id, vni, cidr in ((self.internal, 7101, INTERNAL_CIDR),
                                      (self.external, 7102, f"{EXTERNAL_PREFIX}.0/24")):
            self.dataplane.ensure_network(tasks_pb2.EnsureNetworkRequest(
                network_id=network_id, vni=vni, subnets=[tasks_pb2.DataplaneSubnet(
                    id=f"subnet-{vni}", cidr=cidr, dhcp_enabled=False)]))
        self.locks = phases.Locks()

    def guest(self, role: str, mac: str, address: str) -> str:
        guest = self.spaces.attach_guest(self.node, network_devices.bridge(self.internal), role,
                                         mac)
        netns.run("ip", "-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
        netns.run("ip", "-n", guest, "route", "add", "default", "via", "10.88.0.1")
        return guest

    def upstream(self) -> str:
        """The external side: a port of the external bridge, with no route to the guests."""
        outside = self.spaces.attach_guest(self.node, network_devices.bridge(self.external),
                                           "ext", "fa:16:3e:20:00:01")
        netns.run("ip", "-n", outside, "addr", "add", f"{UPSTREAM}/24", "dev", "eth0")
        return outside

    def request(self, floating: list[tuple[str, str]] | None = None,
                snat: bool = True) -> tasks_pb2.EnsureRouterRequest:
        return tasks_pb2.EnsureRouterRequest(
            router_id=self.router_id,
            interfaces=[tasks_pb2.RouterInterface(network_id=self.internal,
                                                  address="10.88.0.1/24",
                                                  mac_address="fa:16:3e:30:00:01")],
            gateway=tasks_pb2.RouterGateway(network_id=self.external, address=f"{GATEWAY}/24",
                                            next_hop=UPSTREAM, mac_address="fa:16:3e:30:00:02",
                                            enable_snat=snat),
            floating_ips=[tasks_pb2.RouterFloatingIp(floating_ip_address=f, fixed_ip_address=x)
                          for f, x in (floating or [])],
        )

    def call(self, task: phases.AgentTask[Any, Any], request: Message) -> Any:
        ctx = phases.Context(node="node-1", operation_id=tasks.new_operation_id(),
                             task_id="t", deadline=_far())
        outcome = phases.run(task, ctx, tasks.to_json(request), self.locks)
        return tasks.outcome_response(task.spec, outcome, "node-1")

    def ensure(self, request: tasks_pb2.EnsureRouterRequest) -> tasks_pb2.EnsureRouterResponse:
        response: tasks_pb2.EnsureRouterResponse = self.call(
            routing.EnsureRouter(self.dataplane.routers), request)
        return response

    def state(self) -> tasks_pb2.RealizedRouter | None:
        response: tasks_pb2.RouterStateResponse = self.call(
            routing.RouterState(self.dataplane.routers),
            tasks_pb2.RouterStateRequest(router_id=self.router_id))
        return response.routers[0] if response.routers else None

    def remove(self) -> tasks_pb2.RemoveRouterResponse:
        response: tasks_pb2.RemoveRouterResponse = self.call(
            routing.RemoveRouter(self.dataplane.routers),
            tasks_pb2.RemoveRouterRequest(router_id=self.router_id))
        return response


def _far() -> float:
    return time.time() + 60


@pytest.fixture
def site(spaces: netns.Namespaces, tmp_path: Path) -> Iterator[Site]:
    made = Site(spaces, tmp_path / "state")
    try:
        yield made
    finally:
        made.dataplane.routers.remove_router(made.router_id)
        for network_id in (made.internal, made.external):
            made.dataplane.remove_network(network_id)


def test_guests_reach_the_outside_through_snat_and_a_floating_ip_reaches_its_guest(
        site: Site) -> None:
    floating_guest = site.guest("g1", "fa:16:3e:10:00:05", GUEST_WITH_FLOATING)
    plain_guest = site.guest("g2", "fa:16:3e:10:00:06", GUEST_WITHOUT)
    outside = site.upstream()

    answer = site.ensure(site.request(floating=[(FLOATING, GUEST_WITH_FLOATING)]))

    assert answer.changed and answer.dataplane == "kernel"
    assert answer.namespace == network_devices.router_namespace(site.router_id, site.node)
    assert answer.nft_table == network_devices.router_table(site.router_id)
    # A guest without a floating IP goes out as the router's gateway address...
    assert netns.seen_from(outside, plain_guest, UPSTREAM, 18080) == GATEWAY
    # ...one with a floating IP as its floating IP...
    assert netns.seen_from(outside, floating_guest, UPSTREAM, 18081) == FLOATING
    # ...and the outside reaches it at its floating IP (DNAT), seen as itself.
    assert netns.seen_from(floating_guest, outside, FLOATING, 18082) == UPSTREAM


def test_the_realized_router_reads_back_and_a_repeat_changes_nothing(site: Site) -> None:
    request = site.request(floating=[(FLOATING, GUEST_WITH_FLOATING)])
    assert site.ensure(request).changed

    state = site.state()

    assert state is not None and state.ip_forwarding
    assert state.namespace == network_devices.router_namespace(site.router_id, site.node)
    assert [(leg.device, leg.bridge, leg.gateway, list(leg.addresses)) for leg in state.legs] == [
        (router_plan.gateway_leg(site.external), network_devices.bridge(site.external), True,
         [f"{FLOATING}/32", f"{GATEWAY}/24"]),
        (router_plan.leg(site.internal), network_devices.bridge(site.internal), False,
         ["10.88.0.1/24"]),
    ]
    assert [leg.mac_address for leg in state.legs] == ["fa:16:3e:30:00:02", "fa:16:3e:30:00:01"]
    assert list(state.routes) == [f"default via {UPSTREAM}"]
    assert list(state.nat_rules) == [f"dnat {FLOATING} to {GUEST_WITH_FLOATING}",
                                     f"snat {INTERNAL_CIDR} to {GATEWAY}",
                                     f"snat {GUEST_WITH_FLOATING} to {FLOATING}"]
    assert site.state() == router_plan.desired(request, site.node)
    assert not site.ensure(request).changed
    # The bridge ends of the legs hold no address, not even a link-local one.
    for leg in state.legs:
        shown = netns.run("ip", "-n", site.node, "-o", "addr", "show", "dev", leg.peer).stdout
        assert shown.strip() == ""


def test_static_routes_are_held_and_dropped(site: Site) -> None:
    request = site.request()
    request.routes.add(destination="10.90.0.0/16", nexthop="10.88.0.254")
    request.routes.add(destination="10.91.0.7/32", nexthop="10.88.0.254")
    site.ensure(request)

    state = site.state()
    assert state is not None
    assert list(state.routes) == ["10.90.0.0/16 via 10.88.0.254", "10.91.0.7 via 10.88.0.254",
                                  f"default via {UPSTREAM}"]
    assert not site.ensure(request).changed
    del request.routes[0]
    assert site.ensure(request).changed
    state = site.state()
    assert state is not None
    assert list(state.routes) == ["10.91.0.7 via 10.88.0.254", f"default via {UPSTREAM}"]


def test_floating_ips_come_and_go_and_snat_turns_off(site: Site) -> None:
    site.ensure(site.request(floating=[(FLOATING, GUEST_WITH_FLOATING)]))
    second = f"{EXTERNAL_PREFIX}.11"

    moved = site.request(floating=[(second, GUEST_WITHOUT)], snat=False)
    assert site.ensure(moved).changed

    state = site.state()
    assert state is not None
    assert list(state.nat_rules) == [f"dnat {second} to {GUEST_WITHOUT}",
                                     f"snat {GUEST_WITHOUT} to {second}"]
    gateway_leg = next(leg for leg in state.legs if leg.gateway)
    assert list(gateway_leg.addresses) == [f"{second}/32", f"{GATEWAY}/24"]
    assert not site.ensure(moved).changed


def test_a_removed_router_leaves_no_namespace_leg_or_table(site: Site) -> None:
    site.ensure(site.request(floating=[(FLOATING, GUEST_WITH_FLOATING)]))
    namespace = network_devices.router_namespace(site.router_id, site.node)

    removed = site.remove()

    assert removed.changed
    assert namespace not in netns.run("ip", "netns", "list").stdout
    node_links = netns.run("ip", "-n", site.node, "-o", "link", "show").stdout
    assert "nrl-" not in node_links
    assert site.state() is None
    assert site.router_id not in site.dataplane.routers.router_ids()
    assert not site.remove().changed
    # The networks go too, and with them every device of the node.
    for network_id in (site.internal, site.external):
        site.dataplane.remove_network(network_id)
    node_links = netns.run("ip", "-n", site.node, "-o", "link", "show").stdout
    assert [line for line in node_links.splitlines() if ": lo:" not in line] == []


def test_a_leg_into_a_network_the_node_does_not_carry_is_refused(site: Site) -> None:
    request = site.request()
    request.interfaces.add(network_id=str(uuid.uuid4()), address="10.99.0.1/24",
                           mac_address="fa:16:3e:30:00:09")

    with pytest.raises(errors.FailedPrecondition) as refused:
        site.ensure(request)

    assert refused.value.reason == "nubis.agent.network_not_realized"
    assert site.state() is None
