"""Bind address and advertised address: a server bound to every interface publishes a dialable one.

The catalog entry of a server bound to 0.0.0.0 names this machine's host name
(or advertise_host when set), and a client that only knows identity reaches
the server through it.
"""

from __future__ import annotations

import socket

import pytest
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common.settings import ServiceEndpoint
from tests.functional.service_client_harness import NODES, CloudFactory, make_cloud, metric

__all__ = ["make_cloud"]


@pytest.mark.parametrize(("advertise", "expected_host"), [
    ("", socket.gethostname()),
    ("127.0.0.1", "127.0.0.1"),
], ids=["host-name", "advertise-host"])
async def test_a_wildcard_bind_publishes_a_dialable_address(
    make_cloud: CloudFactory, advertise: str, expected_host: str,
) -> None:
    cloud = await make_cloud()
    scheduler = await cloud.start_scheduler(
        ServiceEndpoint(host="0.0.0.0", port=0, advertise_host=advertise))
    clients = cloud.clients()
    listed = await clients.identity.ListEndpoints(identity_pb2.ListEndpointsRequest(
        name="scheduler"))
    addresses = [endpoint.address for endpoint in listed.endpoints]
    assert addresses == [f"{expected_host}:{scheduler.running.port}"]
    node = await clients.scheduler.GetNode(scheduler_pb2.GetNodeRequest(name=NODES[0]))
    assert node.name == NODES[0] and metric(scheduler, "GetNode", "OK") == 1
