"""Security group benchmark: how long a rule change takes to reach every bound port.

Starts its own etcd and Redis, identity, a scheduler and network in this
process and two `nubis-agent` processes (libvirt test driver: filters are
kept by the agent as it would define them), binds `--ports` ports of one
security group across the two nodes, then times CreateSecurityGroupRule and
DeleteSecurityGroupRule calls: each returns once every bound port's node
answered its new filter (`network.ensure_port_filter`, remote groups
resolved). Reports the median and p95 seconds per rule change and the filters
sent per second. Usage: ``python bench/security_group_bench.py [--ports N]
[--changes K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from google.protobuf import field_mask_pb2
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.network.v1 import network_pb2, port_pb2, security_group_pb2, subnet_pb2

from services.common.logging import configure_logging
from services.common.settings import Settings

# The cloud is the one the network tests run on (tests/functional/network).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import EtcdEndpoint, RedisEndpoint, etcd_and_redis
from tests.functional.network import harness

P = security_group_pb2
Rule = P.SecurityGroupRule
NODES = ("sg-bench-1", "sg-bench-2")
TARGET_SECONDS = 5.0
"""Median seconds for a rule change to reach 100 bound ports on 2 nodes (measured ~2 s)."""


def _meta(name: str) -> resource_pb2.ResourceMeta:
    return resource_pb2.ResourceMeta(name=name)


async def run(etcd: EtcdEndpoint, redis: RedisEndpoint, workdir: Path,
              args: argparse.Namespace) -> dict[str, float]:
    cloud = await harness.start_cloud(etcd, redis, f"/sg-bench-{uuid.uuid4().hex[:6]}", workdir)
    try:
        world = cloud.world
        await world.stub.UpdateQuota(identity_pb2.UpdateQuotaRequest(
            quota=identity_pb2.Quota(project_id=world.project_a, limits={"ports": -1}),
            update_mask=field_mask_pb2.FieldMask(paths=["limits.ports"])),
            metadata=world.metadata("cloud_admin"))
        for name in NODES:
            await cloud.start_agent(name)
        api, admin = cloud.api(), cloud.api("cloud_admin")
        net = await api.CreateNetwork(network_pb2.CreateNetworkRequest(
            network=network_pb2.Network(meta=_meta("sg-bench"))))
        await api.CreateSubnet(subnet_pb2.CreateSubnetRequest(subnet=subnet_pb2.Subnet(
            network_id=net.meta.id, cidr="10.200.0.0/16", dhcp_enabled=True)))
        group = await api.CreateSecurityGroup(P.CreateSecurityGroupRequest(
            security_group=P.SecurityGroup(meta=_meta("sg-bench"))))
        gate = asyncio.Semaphore(8)

        async def made(index: int) -> str:
            async with gate:
                port = await api.CreatePort(port_pb2.CreatePortRequest(port=port_pb2.Port(
                    network_id=net.meta.id, security_group_ids=[group.meta.id])))
                return str(port.meta.id)

        async def bound(index: int, port_id: str) -> None:
            async with gate:
                await admin.BindPort(port_pb2.BindPortRequest(
                    id=port_id, node=NODES[index % len(NODES)], device_id=str(uuid.uuid4())),
                    timeout=120)

        port_ids = await asyncio.gather(*(made(i) for i in range(args.ports)))
        started = time.perf_counter()
        await asyncio.gather(*(bound(i, port_id) for i, port_id in enumerate(port_ids)))
        binding = time.perf_counter() - started
        took: list[float] = []
        for change in range(args.changes):
            started = time.perf_counter()
            rule = await api.CreateSecurityGroupRule(P.CreateSecurityGroupRuleRequest(
                security_group_rule=Rule(security_group_id=group.meta.id, protocol="tcp",
                                         direction=Rule.DIRECTION_INGRESS,
                                         port_range_min=1000 + change,
                                         port_range_max=1000 + change)))
            took.append(time.perf_counter() - started)
            started = time.perf_counter()
            await api.DeleteSecurityGroupRule(P.DeleteSecurityGroupRuleRequest(id=rule.meta.id))
            took.append(time.perf_counter() - started)
    finally:
        await harness.stop_cloud(cloud)
    median = statistics.median(took)
    p95 = sorted(took)[max(0, round(0.95 * len(took)) - 1)]
    return {"bound_ports": args.ports, "nodes": len(NODES), "rule_changes": len(took),
            "median_s": round(median, 3), "p95_s": round(p95, 3),
            "filters_per_s": round(args.ports / median, 1),
            "binds_per_s": round(args.ports / binding, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--changes", type=int, default=5)
    args = parser.parse_args()
    configure_logging(Settings(log_level="warning", log_json=False))
    with tempfile.TemporaryDirectory(prefix="nubis-sg-bench-") as tmp:
        workdir = Path(tmp)
        with etcd_and_redis(workdir) as (etcd, redis):
            met = asyncio.run(run(etcd, redis, workdir, args))
    met["target_median_s"] = TARGET_SECONDS
    print(json.dumps(met, indent=2))
    sys.exit(0 if met["median_s"] <= TARGET_SECONDS else 1)


if __name__ == "__main__":
    main()
