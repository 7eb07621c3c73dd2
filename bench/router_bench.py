"""Router benchmark: time to realize a nubis router on a network node (kernel dataplane).

Runs as root, inside a network namespace of its own (the "node", removed at
the end with everything in it) holding an internal and an external network.
For each of `--routers` fresh routers it times `ensure_router` from nothing
(namespace, forwarding, both legs, default route, the NAT table with
`--floating` floating IPs), the same ensure again (converged: reads only),
one floating IP more (an address and the table replaced), then
`remove_router`. Prints median and p95 of each, in ms.
Usage: ``python bench/router_bench.py [--routers N] [--floating F]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid

import kernel_node
import structlog
from nubis.agent.v1 import tasks_pb2

from services.agent.dataplane import kernel

TARGET_FIRST_MS = 1000.0
"""A router from nothing on a network node: under a second."""


def _request(router_id: str, internal: str, external: str,
             floating: int) -> tasks_pb2.EnsureRouterRequest:
    request = tasks_pb2.EnsureRouterRequest(
        router_id=router_id,
        interfaces=[tasks_pb2.RouterInterface(network_id=internal, address="10.201.0.1/16",
                                              mac_address="fa:16:3e:b0:00:01")],
        gateway=tasks_pb2.RouterGateway(network_id=external, address="198.18.0.2/16",
                                        next_hop="198.18.0.1", mac_address="fa:16:3e:b0:00:02",
                                        enable_snat=True))
    for i in range(floating):
        request.floating_ips.add(floating_ip_address=f"198.18.{1 + i // 250}.{i % 250 + 1}",
                                 fixed_ip_address=f"10.201.{1 + i // 250}.{i % 250 + 1}")
    return request


def run(routers: int, floating: int) -> dict[str, object]:
    timings: dict[str, list[float]] = {"first": [], "repeat": [], "one_floating_ip_more": [],
                                       "remove": []}
    with kernel_node.node_namespace("nubis-router-bench-") as (node, state):
        dataplane = kernel.KernelDataplane("198.18.255.1", state, netns=node)
        internal, external = str(uuid.uuid4()), str(uuid.uuid4())
        for network_id, vni, cidr in ((internal, 9101, "10.201.0.0/16"),
                                      (external, 9102, "198.18.0.0/16")):
            dataplane.ensure_network(tasks_pb2.EnsureNetworkRequest(
                network_id=network_id, vni=vni, subnets=[tasks_pb2.DataplaneSubnet(
                    id=f"bench-{vni}", cidr=cidr, dhcp_enabled=False)]))
        for _ in range(routers):
            router_id = str(uuid.uuid4())
            request = _request(router_id, internal, external, floating)
            timings["first"].append(kernel_node.timed(dataplane.routers.ensure_router, request))
            timings["repeat"].append(kernel_node.timed(dataplane.routers.ensure_router, request))
            grown = _request(router_id, internal, external, floating + 1)
            timings["one_floating_ip_more"].append(
                kernel_node.timed(dataplane.routers.ensure_router, grown))
            timings["remove"].append(kernel_node.timed(dataplane.routers.remove_router, router_id))
        for network_id in (internal, external):
            dataplane.remove_network(network_id)
    result: dict[str, object] = {name: kernel_node.summary(samples)
                                 for name, samples in timings.items()}
    result.update(routers=routers, floating_ips=floating, target_first_ms=TARGET_FIRST_MS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--routers", type=int, default=20)
    parser.add_argument("--floating", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the kernel dataplane needs root")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = run(args.routers, args.floating)
    print(json.dumps(result, indent=2))
    first = result["first"]
    assert isinstance(first, dict)
    print(f"realize a router from nothing: median {first['median_ms']} ms "
          f"(target < {TARGET_FIRST_MS:.0f} ms)")


if __name__ == "__main__":
    main()
