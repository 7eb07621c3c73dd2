"""Dataplane benchmark: time to realize a nubis network on a node with the kernel dataplane.

Runs as root, inside a network namespace of its own (the "node", removed at
the end with everything in it). For each of `--networks` fresh networks it
times `ensure_network` from nothing (bridge, vxlan with `--peers` flood
entries, DHCP namespace, dnsmasq started with `--ports` host entries), then
the same ensure again (converged: reads only), then one port more (a hosts
reload), then `remove_network`. Prints median and p95 of each, in ms.
Usage: ``python bench/dataplane_bench.py [--networks N] [--ports P] [--peers K]``.
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
"""A network from nothing on a node, DHCP running: under a second."""


def _request(network_id: str, vni: int, ports: int, peers: int) -> tasks_pb2.EnsureNetworkRequest:
    request = tasks_pb2.EnsureNetworkRequest(
        network_id=network_id, vni=vni,
        vxlan_peers=[f"198.18.{i // 250}.{i % 250 + 1}" for i in range(peers)],
        subnets=[tasks_pb2.DataplaneSubnet(
            id="bench", cidr="10.200.0.0/16", gateway_ip="10.200.0.1", dhcp_enabled=True,
            dhcp_address="10.200.0.2", dns_nameservers=["192.0.2.53"])])
    for i in range(ports):
        request.ports.add(
            id=f"port-{i}", mac_address=f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                        f"{i & 255:02x}",
            fixed_ips=[tasks_pb2.DataplaneFixedIp(
                subnet_id="bench", ip_address=f"10.200.{(i + 10) // 250}.{(i + 10) % 250 + 1}")])
    return request


def run(networks: int, ports: int, peers: int) -> dict[str, object]:
    timings: dict[str, list[float]] = {"first": [], "repeat": [], "one_port_more": [],
                                       "remove": []}
    with kernel_node.node_namespace("nubis-dataplane-bench-") as (node, state):
        dataplane = kernel.KernelDataplane("198.18.255.1", state, netns=node)
        for index in range(networks):
            network_id = str(uuid.uuid4())
            request = _request(network_id, 9000 + index, ports, peers)
            timings["first"].append(kernel_node.timed(dataplane.ensure_network, request))
            timings["repeat"].append(kernel_node.timed(dataplane.ensure_network, request))
            grown = _request(network_id, 9000 + index, ports + 1, peers)
            timings["one_port_more"].append(kernel_node.timed(dataplane.ensure_network, grown))
            timings["remove"].append(kernel_node.timed(dataplane.remove_network, network_id))
    result: dict[str, object] = {name: kernel_node.summary(samples)
                                 for name, samples in timings.items()}
    result.update(networks=networks, ports=ports, peers=peers, target_first_ms=TARGET_FIRST_MS)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--networks", type=int, default=20)
    parser.add_argument("--ports", type=int, default=50)
    parser.add_argument("--peers", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the kernel dataplane needs root")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = run(args.networks, args.ports, args.peers)
    print(json.dumps(result, indent=2))
    first = result["first"]
    assert isinstance(first, dict)
    print(f"realize a network from nothing: median {first['median_ms']} ms "
          f"(target < {TARGET_FIRST_MS:.0f} ms)")


if __name__ == "__main__":
    main()
