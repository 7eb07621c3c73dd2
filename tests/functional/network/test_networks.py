"""Networks, subnets and ports over the API: defaults, validation naming the field, visibility."""

from __future__ import annotations

import ipaddress

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nubis.network.v1 import network_pb2, port_pb2, subnet_pb2

from services.client.rpc_errors import error_reason
from tests.functional.network.harness import NetCloud, code_of


def _violations(exc: BaseException) -> list[str]:
    from google.rpc import error_details_pb2, status_pb2

    assert isinstance(exc, grpc.aio.AioRpcError)
    found = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    found += [violation.field for violation in bad.field_violations]
    return found


async def test_network_defaults_and_unique_vni(cloud: NetCloud) -> None:
    first = await cloud.make_network()
    second = await cloud.make_network()
    assert first.state == network_pb2.Network.ACTIVE
    assert first.mtu == 1450 and not first.shared and not first.external
    assert first.segmentation_id and second.segmentation_id
    assert first.segmentation_id != second.segmentation_id
    assert first.meta.project_id == cloud.world.project_a


async def test_only_cloud_admin_makes_shared_or_external(cloud: NetCloud) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_network(shared=True)
    assert code_of(caught.value) == grpc.StatusCode.PERMISSION_DENIED
    shared = await cloud.make_network("cloud_admin", shared=True)
    assert shared.shared


async def test_subnet_defaults(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    made = await cloud.make_subnet(net.meta.id, "10.20.0.0/24", dhcp_enabled=True,
                              dns_nameservers=["10.20.0.53"])
    assert made.gateway_ip == "10.20.0.1"
    assert [(p.start, p.end) for p in made.allocation_pools] == [("10.20.0.2", "10.20.0.254")]
    assert made.dhcp_address == "10.20.0.2"
    assert made.ip_version == 4
    again = await cloud.call("GetNetwork", network_pb2.GetNetworkRequest(id=net.meta.id))
    assert list(again.subnet_ids) == [made.meta.id]


@pytest.mark.parametrize(("fields", "field"), [
    ({"cidr": "10.0.0.0/33"}, "subnet.cidr"),
    ({"cidr": "not-a-cidr"}, "subnet.cidr"),
    ({"cidr": "10.0.0.1/24"}, "subnet.cidr"),
    ({"cidr": "10.0.0.0/24", "gateway_ip": "10.0.1.1"}, "subnet.gateway_ip"),
    ({"cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.20",
      "allocation_pools": [subnet_pb2.AllocationPool(start="10.0.0.10", end="10.0.0.30")]},
     "subnet.gateway_ip"),
    ({"cidr": "10.0.0.0/24", "allocation_pools": [
        subnet_pb2.AllocationPool(start="10.0.0.10", end="10.0.0.50"),
        subnet_pb2.AllocationPool(start="10.0.0.40", end="10.0.0.60")]},
     "subnet.allocation_pools[1]"),
    ({"cidr": "10.0.0.0/24", "allocation_pools": [
        subnet_pb2.AllocationPool(start="10.0.0.10", end="10.0.1.50")]},
     "subnet.allocation_pools[0]"),
])
async def test_invalid_subnets_name_the_field(cloud: NetCloud, fields: dict[str, object],
                                              field: str) -> None:
    net = await cloud.make_network()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_subnet(net.meta.id, **fields)  # type: ignore[arg-type]
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert field in _violations(caught.value)


async def test_overlapping_cidrs(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    other = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.30.0.0/24")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_subnet(net.meta.id, "10.30.0.128/25")
    assert code_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert "subnet.cidr" in _violations(caught.value)
    # The same range on another network is fine.
    await cloud.make_subnet(other.meta.id, "10.30.0.0/24")


async def test_racing_overlapping_subnets_one_wins(cloud: NetCloud) -> None:
    import asyncio

    net = await cloud.make_network()
    outcomes = await asyncio.gather(
        *(cloud.make_subnet(net.meta.id, f"10.40.{i}.0/24" if i % 2 else "10.40.0.0/16")
          for i in range(6)), return_exceptions=True)
    made = [o for o in outcomes if isinstance(o, subnet_pb2.Subnet)]
    cidrs = [ipaddress.ip_network(s.cidr) for s in made]
    assert all(not a.overlaps(b) for i, a in enumerate(cidrs) for b in cidrs[i + 1:])
    assert made
    for failed in outcomes:
        if not isinstance(failed, subnet_pb2.Subnet):
            assert code_of(failed) == grpc.StatusCode.INVALID_ARGUMENT


async def test_port_gets_mac_and_address(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    made = await cloud.make_subnet(net.meta.id, "10.50.0.0/24", dhcp_enabled=True)
    port = await cloud.make_port(net.meta.id)
    assert port.state == port_pb2.Port.DOWN
    assert port.mac_address.startswith("fa:16:3e:")
    assert port.port_security_enabled and port.admin_state_up
    assert len(port.security_group_ids) == 1  # the project's default group
    [fixed] = port.fixed_ips
    assert fixed.subnet_id == made.meta.id
    assert fixed.ip_address not in ("10.50.0.1", "10.50.0.2")
    wanted = await cloud.make_port(net.meta.id,
                                   fixed_ips=[port_pb2.FixedIp(ip_address="10.50.0.77")])
    assert wanted.fixed_ips[0].ip_address == "10.50.0.77"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_port(net.meta.id,
                              fixed_ips=[port_pb2.FixedIp(ip_address="10.50.0.77")])
    assert code_of(caught.value) == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(caught.value) == "nubis.ipam.address_in_use"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_port(net.meta.id, mac_address=port.mac_address)
    assert code_of(caught.value) == grpc.StatusCode.ALREADY_EXISTS


async def test_port_on_another_projects_network_is_not_found(cloud: NetCloud) -> None:
    private = await cloud.make_network()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.make_port(private.meta.id, caller="b_admin")
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("GetNetwork", network_pb2.GetNetworkRequest(id=private.meta.id),
                         "b_admin")
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND
    shared = await cloud.make_network("cloud_admin", shared=True)
    await cloud.make_subnet(shared.meta.id, "10.60.0.0/24", caller="cloud_admin")
    theirs = await cloud.make_port(shared.meta.id, caller="b_admin")
    assert theirs.meta.project_id == cloud.world.project_b
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("GetPort", port_pb2.GetPortRequest(id=theirs.meta.id), "a_member")
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND


async def test_delete_network_refused_while_ports_exist(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.70.0.0/24", dhcp_enabled=True)
    port = await cloud.make_port(net.meta.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("DeleteNetwork", network_pb2.DeleteNetworkRequest(id=net.meta.id))
    assert code_of(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(caught.value) == "nubis.network.in_use"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("DeleteSubnet", subnet_pb2.DeleteSubnetRequest(id=net.subnet_ids[0])
                         if net.subnet_ids else subnet_pb2.DeleteSubnetRequest(
                             id=port.fixed_ips[0].subnet_id))
    assert code_of(caught.value) == grpc.StatusCode.FAILED_PRECONDITION
    await cloud.call("DeletePort", port_pb2.DeletePortRequest(id=port.meta.id))
    await cloud.call("DeleteNetwork", network_pb2.DeleteNetworkRequest(id=net.meta.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cloud.call("GetNetwork", network_pb2.GetNetworkRequest(id=net.meta.id))
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND
    # Its VNI is free again, and so is the quota.
    assert await cloud.store.find(f"network/segments/{net.segmentation_id}",
                                  network_pb2.Network) is None


async def test_update_port_and_list_filter(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.80.0.0/24")
    port = await cloud.make_port(net.meta.id)
    port.port_security_enabled = False
    updated = await cloud.call("UpdatePort", port_pb2.UpdatePortRequest(
        port=port, update_mask=field_mask_pb2.FieldMask(paths=["port_security_enabled"])))
    assert not updated.port_security_enabled and not updated.security_group_ids
    listed = await cloud.call("ListPorts", port_pb2.ListPortsRequest(
        filter=f"ip_address={port.fixed_ips[0].ip_address}"))
    assert [p.meta.id for p in listed.ports] == [port.meta.id]


async def test_ip_availability(cloud: NetCloud) -> None:
    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.90.0.0/28", dhcp_enabled=True)
    await cloud.make_port(net.meta.id)
    got = await cloud.call("GetNetworkIpAvailability", network_pb2.GetNetworkIpAvailabilityRequest(
        network_id=net.meta.id), "a_admin")
    # /28: 14 hosts, less the gateway = 13 in the pool; DHCP and one port use 2.
    assert (got.total_ips, got.used_ips) == (13, 2)


async def test_watch_ports(cloud: NetCloud) -> None:
    import asyncio

    from nubis.common.v1 import resource_pb2

    net = await cloud.make_network()
    await cloud.make_subnet(net.meta.id, "10.95.0.0/24")
    stream = cloud.stub().WatchPorts(port_pb2.WatchPortsRequest(
        options=resource_pb2.WatchOptions(initial_state=True),
        filter=f"network_id={net.meta.id}"), metadata=cloud.world.metadata("a_member"))
    first = await stream.read()
    assert isinstance(first, port_pb2.PortEvent)
    assert first.type == resource_pb2.EVENT_TYPE_SYNCED
    port = await cloud.make_port(net.meta.id)
    added = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(added, port_pb2.PortEvent)
    assert added.type == resource_pb2.EVENT_TYPE_ADDED and added.port.meta.id == port.meta.id
    await cloud.call("DeletePort", port_pb2.DeletePortRequest(id=port.meta.id))
    gone = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(gone, port_pb2.PortEvent)
    assert gone.type == resource_pb2.EVENT_TYPE_DELETED and gone.port.meta.id == port.meta.id
    assert gone.port.state == port_pb2.Port.DELETED
    stream.cancel()
