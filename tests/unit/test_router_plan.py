"""Router plans as pure functions: request checks, the state to reach, the commands and the
NAT script, and the recording routers that run the same plan without a kernel."""

from __future__ import annotations

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import recording, router_plan
from services.common import errors, network_devices

ROUTER = "0f0e0d0c-0b0a-4000-8000-000000000001"
INTERNAL = "1a1a1a1a-1a1a-4000-8000-000000000001"
EXTERNAL = "2b2b2b2b-2b2b-4000-8000-000000000002"


def _request(**overrides: object) -> tasks_pb2.EnsureRouterRequest:
    request = tasks_pb2.EnsureRouterRequest(
        router_id=ROUTER,
        interfaces=[tasks_pb2.RouterInterface(network_id=INTERNAL, address="10.0.0.1/24",
                                              mac_address="fa:16:3e:00:00:01")],
        gateway=tasks_pb2.RouterGateway(network_id=EXTERNAL, address="203.0.113.5/24",
                                        next_hop="203.0.113.1",
                                        mac_address="fa:16:3e:00:00:02", enable_snat=True),
        floating_ips=[tasks_pb2.RouterFloatingIp(floating_ip_address="203.0.113.10",
                                                 fixed_ip_address="10.0.0.5")],
    )
    for name, value in overrides.items():
        setattr(request, name, value)
    return request


def _violations(request: tasks_pb2.EnsureRouterRequest) -> set[str]:
    with pytest.raises(errors.InvalidArgument) as refused:
        router_plan.check(request)
    return {violation.field for violation in refused.value.violations}


def test_a_good_request_passes() -> None:
    router_plan.check(_request())


def test_bad_fields_are_named() -> None:
    request = _request(router_id="nope")
    request.interfaces[0].address = "10.0.0.1"  # no prefix
    request.gateway.next_hop = "198.51.100.1"  # outside the gateway's subnet
    request.floating_ips.add(floating_ip_address="203.0.113.11", fixed_ip_address="10.9.9.9")
    request.routes.add(destination="10.5.0.0/16", nexthop="192.0.2.1")

    assert _violations(request) == {
        "router_id", "interfaces[0].address", "gateway.next_hop",
        "floating_ips[0].fixed_ip_address", "floating_ips[1].fixed_ip_address",
        "routes[0].nexthop"}


def test_a_mac_in_capitals_is_taken_and_held_in_lower_case() -> None:
    request = _request()
    request.interfaces[0].mac_address = "FA:16:3E:00:00:01"
    router_plan.check(request)

    held = router_plan.desired(request, "")

    assert {leg.mac_address for leg in held.legs} == {"fa:16:3e:00:00:01", "fa:16:3e:00:00:02"}


def test_an_ipv6_address_turns_ipv6_forwarding_on() -> None:
    request = _request()
    request.interfaces.add(network_id=INTERNAL, address="fd00::1/64",
                           mac_address="fa:16:3e:00:00:01")
    router_plan.check(request)

    commands = router_plan.steps(None, request, "")

    namespace = network_devices.router_namespace(ROUTER)
    assert ("ip", "-n", namespace, "addr", "add", "fd00::1/64", "dev",
            router_plan.leg(INTERNAL)) in commands
    assert ("ip", "netns", "exec", namespace, "sysctl", "-qw",
            "net.ipv6.conf.all.forwarding=1") in commands
    assert not any("ipv6" in " ".join(c) for c in router_plan.steps(None, _request(), ""))


def test_floating_ips_need_a_gateway() -> None:
    request = _request()
    request.ClearField("gateway")

    assert "floating_ips" in _violations(request)


def test_the_nat_script_replaces_the_table_whole_floating_ips_first() -> None:
    script = router_plan.ruleset(_request())
    table = network_devices.router_table(ROUTER)
    out = router_plan.gateway_leg(EXTERNAL)

    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == [f"table inet {table} {{}}", f"delete table inet {table}",
                         f"table inet {table} {{"]
    assert "ip daddr 203.0.113.10 dnat ip to 10.0.0.5" in lines
    floating = lines.index(f'ip saddr 10.0.0.5 oifname "{out}" snat ip to 203.0.113.10')
    masquerade = lines.index(f'ip saddr 10.0.0.0/24 oifname "{out}" snat ip to 203.0.113.5')
    assert floating < masquerade


def test_a_node_holding_the_router_needs_no_command() -> None:
    request = _request()
    held = router_plan.desired(request, "node-a")

    assert router_plan.steps(held, request, "node-a") == []
    first = router_plan.steps(None, request, "node-a")
    assert first[0] == ("ip", "netns", "add", f"node-a.nrouter-{ROUTER}")
    assert first[-1][0] == router_plan.NFT_LOAD


def test_a_dropped_floating_ip_changes_only_its_address_and_the_table() -> None:
    before = _request()
    after = _request()
    del after.floating_ips[:]

    commands = router_plan.steps(router_plan.desired(before, ""), after, "")

    namespace = network_devices.router_namespace(ROUTER)
    assert commands[0] == ("ip", "-n", namespace, "addr", "del", "203.0.113.10/32", "dev",
                           router_plan.gateway_leg(EXTERNAL))
    assert [c[0] for c in commands[1:]] == [router_plan.NFT_LOAD]


def test_recording_routers_refuse_networks_the_node_does_not_carry_and_record_the_rest(
) -> None:
    dataplane = recording.RecordingDataplane("127.0.0.1")
    with pytest.raises(errors.FailedPrecondition):
        dataplane.routers.ensure_router(_request())
    for network_id, vni in ((INTERNAL, 10), (EXTERNAL, 11)):
        dataplane.ensure_network(tasks_pb2.EnsureNetworkRequest(network_id=network_id, vni=vni))

    assert dataplane.routers.ensure_router(_request())
    assert not dataplane.routers.ensure_router(_request())
    assert dataplane.routers.router_state(ROUTER) == router_plan.desired(_request(), "")
    assert dataplane.routers.remove_router(ROUTER)
    assert dataplane.routers.router_ids() == []
    assert not dataplane.routers.remove_router(ROUTER)
