"""Compute benchmark: servers booted end to end on libvirt test-driver agents, every process
on this machine, with the raw Celery round trip and the raw etcd transaction rate beside.

Starts a lab (`services/client/lab`: etcd, Redis, identity, scheduler, network,
storage, compute and `--agents` agents, each a process of its own, the image
`lab-hello` and the network `private` seeded), lifts the admin project's quota,
makes a small flavor, then:

1. raw: `nubis.agent.ping` through TaskSender (one caller: p50 round trip; 32 in
   flight over the agents: round trips/s) and etcd create-if-absent transactions
   through aetcd (32 in flight: txn/s), on the same etcd, Redis and agents;
2. boots `--servers` servers, at saturation (closed loop: `--concurrency`
   CreateInstance calls in flight, each caller sending its next create when its
   last one answered) or paced (`--rate R`, open loop: create i sent at i/R
   seconds whatever the answers, each in a task of its own), and follows them
   through WatchInstances (opened before the first create):
   end-to-end throughput (first create sent → last ACTIVE), p50/p99 of
   CreateInstance latency (it answers before the build) and of create → ACTIVE,
   and where the time goes: per task state, from the times the watch saw each
   step begin, and per step of the instances' `create` actions (the service's own
   start/finish times);
   the calls and mean times every service and agent served during the boots, from
   their own /metrics (RPCs, agent tasks sent and their round trips, agent task
   runs), per server; and the CPU of every process for the boots, also less the
   lab's idle CPU (measured for 5 s before the boots) over the boots' wall time;
3. the RSS (now and peak) of every process, then deletes the servers (deletes/s).

Saturation measures the most servers/s the lab sustains; its latencies are
mostly the backlog (the last of 200 servers created at once waits for the 199
before it at any finite rate), so the latency goals are measured paced, at an
offered load below that throughput, as latency at a throughput is usually
measured (an open-loop generator: a slow answer does not slow the next create,
and latencies count from each create's planned send time, so a client falling
behind its schedule shows as latency, not as a lower load).

It prints a table and exits 0 (1 if a server went to ERROR, did not settle
within `--wait` seconds, or could not be created). Usage:
``python bench/compute_bench.py [--servers 20] [--agents 2] [--concurrency 16 | --rate R]
[--wait S]``; the full runs are ``--servers 200 --agents 10 --concurrency 32`` and
``--servers 200 --agents 10 --rate 10`` (and ``--rate 20``).
Goals on 2 cores: >= 20 servers/s end to end, CreateInstance p99 < 50 ms,
create → ACTIVE p99 < 2 s.

Measured on a shared 2-core machine (load 4-17), goals not met yet:
20/2: 4.1 → 8.4 servers/s; CreateInstance p50/p99 235/542 → 289/1024 ms;
create → ACTIVE p99 4.9 → 2.35 s; networking step p50 3.8 s → 0.9-1.2 s,
root disk step 480 → 170-260 ms; deletes 22 servers/s. 200/10: 152 → 200 of
200 ACTIVE, no reschedules, 2.2 servers/s, the networking step p50 29 s
(network's realizations and remote-group filter refreshes grow with the ports
of the one network: the bottleneck now), deletes not finished within --wait.

Then, 200/10 side by side on the same tree, the network changes in and out, one
run right after the other (load 8-17): coalesced background refreshes for
unbinds and deletes too, refreshes at background priority on the agents, binds
of a network sharing transactions: 2.5 → 7.6 servers/s, networking step p50
20.9 → 5.1 s, create → ACTIVE p99 64.6 → 16.4 s, deletes 172 left → 14.4
servers/s, CPU of all processes for the boots 89 → 39 s (a second pair, load
14-18: 3.2 → 5.2 servers/s, networking p50 19.2 → 8.7 s, 172 deletes left → 7.2
servers/s, 73 → 47 CPU s). 20/2 the same way: 13.0 and 11.5 → 9.8 and 13.4
servers/s, networking p50 0.9-1.0 → 0.5-1.0 s, create → ACTIVE p99 1.4-2.0 s
either way: 20 ports are too few for the network's per-port costs to show, and
the load of the machine decides the rest. CreateInstance p50
(0.2-0.5 s at 20/2, 1-4 s at 200/10) is now the wait for the project's turn in
compute (one create transaction at a time per project, ~15 ms each).

Then the creates of one project that wait for its turn share a transaction
(`instance_batch`), 20/2 side by side on the same tree, with and without,
alternating, while a test suite ran on the machine (load 2.7-3.2):
CreateInstance p50/p99 233/565 and 196/460 → 37/45 and 40/43 ms; create →
ACTIVE p99 1.17-1.45 → 1.18-1.30 s; 13.8-16.2 → 15.3-16.9 servers/s.

Then CPU per boot (all processes' CPU during the boots / servers ACTIVE), the tree
before and after four changes, run alternately, each tree a copy of its commit,
while a test suite ran on the machine (load 4-16): a realization reads a node's
ports in one round trip and activates only those read BUILD; an operation's writes
read the record and the instance in one round trip; the lab's etcd at GOGC=50
(not 25); no Celery task events. 100/4 (three pairs): 0.15-0.17 → 0.11-0.12
CPU s a boot (etcd 4.2-4.5 → 2.5-2.6 s, network 2.0-2.6 → 1.7-1.8, agents
4.1-5.6 → 3.1-3.7), 9.5-10.2 → 13.8-15.1 servers/s, create → ACTIVE p99 9.0-9.8
→ 6.2-6.7 s. 200/10/32 (two pairs): 0.18-0.20 → 0.13-0.14 CPU s a boot (36-40
→ 27 CPU s), 8.3-8.6 → 12.3-12.8 servers/s, networking p50 12.9-14.2 → 6.8-8.5
s, create → ACTIVE p99 22-23 → 15 s, deletes 13-15 → 17-18 servers/s; 200 of 200
ACTIVE each time. Goals not met yet: 2 cores at ~0.13 CPU s a boot cap near 15
servers/s. What is left per boot, measured: ~25 etcd round trips from storage, ~15
from compute, ~12 from network (each costs etcd and the caller's gRPC), ~6 agent
tasks whose Celery/kombu machinery (unacked bookkeeping, a Redis client made per
ack, the result's STARTED and SUCCESS) outweighs the task bodies, and the network's
JSON conversion of filter requests and answers.

Then fewer etcd round trips per boot, the tree before and after, each a copy of
its commit, run alternately while test suites ran on the machine (load 4-13):
storage's root disk made in two round trips instead of eight (the image judged
once and compared at commit as read, the transaction's reads in one round trip,
the answer as written), attachment steps read the attachment with its volume and
answer with what they wrote, an outcome reads its operation with its volume;
compute reads an attachment back only when resumed, reads an action with the
operation and the instance, and a running operation's writes compare the records
its last write committed (or its attempt read) instead of reading them again;
network reads a realization's marker, network and attachments in one round trip,
activates a node's ports in one transaction and knows a port's network. etcd
round trips on the boot path (counted per call site, deletes left out), 100
servers: storage ~36 → ~20 a boot, compute ~21 → ~9, network ~20 → ~13
(~7,800 → ~4,400 for the boots; ~10,700 → ~7,400 for the whole run with its
deletes). 100/4/32, two pairs: 9.2 and 15.4 → 12.9 and 15.7 servers/s, 0.15 and 0.11 →
0.11 and 0.11 CPU s a boot (etcd 3.4, 2.3 → 2.1, 1.9 s; storage 2.1, 1.5 → 1.7,
1.4; compute 1.9, 1.4 → 1.5, 1.3; network 2.4, 1.8 → 1.6, 1.6), create → ACTIVE
p99 10.7, 6.3 → 7.5, 6.2 s, CreateInstance p99 475, 412 → 494, 361 ms. 200/10/32:
9.1, 8.5, 7.3 → 19.0, 19.7 servers/s, 0.17-0.21 → 0.09 CPU s a boot, create →
ACTIVE p99 21-26 → 10.0, 9.7 s, 200 of 200 ACTIVE (not at equal load: 11.9-13.3
before, 6.6-8.7 after).
Tried and left out: the activation's transaction also dropping the pair's marker
(every bind re-marking the pair failed the activation's compare too: p99 36 s at
200/10) and the scheduler's UP answer about a node serving its tunnel address for
two seconds (shorter realizations, fewer binds sharing a turn: network CPU 3.2-8.0
against 2.4-2.9 s at 200/10). Goals not met yet; on this shared machine CPU per
boot and throughput swing with the load as much as with the tree. What is left
per boot: storage's pool listing and GetNode for a root disk's placement, the
image read again by the root disk's operation and by kernel_boot's GetImage at
spawn, compute's two operation saves (ports, attachment) before the steps after
them, network's subnets and port-index listing per realization, its filter reads
and writes (port_filter) and the bind's read of the port it answers with, and the
Celery costs above. Seen in two 200/10 runs of the new tree: a root disk failing
with "too many failed logins", which reschedules its server (likely the login
throttle counting concurrent logins of one service user before checking them, now
that root disks for all nodes are asked for closer together).

Then paced runs beside saturation (`--rate`), and what they showed. Measured
first, 200/10 on the tree as it was (load 1-10): saturation (32 in flight) 14.0-18.6
servers/s, 0.10-0.12 CPU s a boot, create -> ACTIVE p99 10.0-13.1 s (the backlog);
paced 10/s 9.1-9.8 servers/s, create -> ACTIVE p50/p99 0.5-2.4 / 2.5-4.4 s,
CreateInstance p99 180-580 ms, 0.16-0.18 CPU s a boot. A paced boot costs more CPU
than one at saturation (fewer creates, binds and realizations share a transaction
or a turn), and its networking step is most of its latency: CreatePort 180-250 ms
and BindPort 270-480 ms mean at 10/s. Where it went, from the services' /metrics,
per call sites of etcd round trips and lost commits, and py-spy: the remote-group
filter refreshes (5-7 `ensure_port_filter` tasks a boot, each ~200 rules, one per
member of the default group, built, turned into JSON, sent and parsed again: a
third of the network's CPU and most of the agents'); ~11 GetNode a boot (the
peers' tunnel addresses of every realization: most of the scheduler's CPU); a
bind's own filter waiting on its node behind a refresh's queued filters (round
trip ~190-300 ms for a 25 ms task); port creates losing their first commit on the
project's usage record (0.8 a boot: compute writes that record for each instance it
creates) and, at 20/s, port batches refused by etcd for their size. Changed: a
remote-group rule admits its members' addresses merged into the fewest prefixes
that cover them exactly; refreshes at most every 1.5 s while binds keep coming; the
peers' addresses from one ListNodes; at most two refresh filters queued on a node;
port creates read the usage in the round trip they make anyway; port batches of 12.
The tree before and after (each a copy of its commit, this bench in both), run
alternately, while guest benchmarks ran on the machine (load 5.6-16.4):
  saturation, 32 in flight: 16.7, 12.4, 13.3 -> 17.0, 7.7, 17.3 servers/s; 0.102,
    0.107, 0.121 -> 0.091, 0.125, 0.087 CPU s a boot; create -> ACTIVE p99 11.3,
    15.1, 13.1 -> 10.2, 23.9, 10.2 s (the second pair ran at the load's peak);
    CreateInstance p99 530, 1526, 706 -> 559, 1237, 794 ms;
  paced 10/s: 9.4, 8.1, 9.3 -> 10.0, 8.7, 9.5 servers/s; 0.165, 0.176, 0.177 ->
    0.158, 0.143, 0.156 CPU s a boot; create -> ACTIVE p50/p99 1.08/3.33,
    2.79/7.04, 0.83/3.30 -> 0.30/1.91, 2.77/5.40, 0.60/2.46 s; CreateInstance
    p50/p99 24/191, 25/316, 28/214 -> 13/156, 49/327, 14/173 ms; filter tasks 5.0,
    5.0 -> 4.4, 3.8 a boot, GetNode 11.0, 9.9 -> 1.4, 1.4 a boot;
  paced 20/s: 11.9, 9.6 -> 16.0, 13.9 servers/s; 0.144, 0.137 -> 0.105, 0.110 CPU s
    a boot; create -> ACTIVE p50/p99 5.2/7.5, 8.0/12.0 -> 2.4/4.7, 4.3/5.9 s;
    CreateInstance p99 1080, 564 -> 353, 469 ms.
Commands: ``--servers 200 --agents 10 --concurrency 32``, ``... --rate 10``, ``...
--rate 20``. Goals not met: >= 20 servers/s end to end (17.3 at best, at
saturation); CreateInstance p99 < 50 ms (156-327 ms paced at 10/s; p50 13-49 ms);
create -> ACTIVE p99 < 2 s (paced at 10/s 1.91 s once, 2.46 and 5.4 s in the others;
4.7-5.9 s at 20/s, which this machine did not sustain while the guest benchmarks ran). At
20/s the 2 cores are the limit: 0.105-0.110 CPU s a boot is 2.1-2.2 cores at 20
boots/s. What is left per boot, measured: the agents' Celery costs (~7 ms of agent
CPU a task, ~8 tasks a boot at 10/s, a third of all CPU); the refreshes, 2-3
filter tasks a boot still, because each one sends every member of the group its
whole filter (the way out is on the agents: a set of a group's member addresses
per node, updated by one task per node, as Neutron's ipsets, the filters naming
the set); the network's listing of every port and group for each bound port's
filter and each refresh (3.2 ranges a boot, O(ports) each); port creates on a
nearly full subnet (the bench's 200 ports in a /24), whose taken address guesses
cost a round trip each, one item after another in the batch's transaction, and
make CreatePort the slowest step at 20/s (0.8-1.6 s mean); compute's two operation
saves and kernel_boot's GetImage at spawn; storage's pool listing for a root
disk's placement.

Then the network's realizations gather a burst's binds for 20 ms (for servers
booted together on one node), one pair on a quiet machine, the tree with the
gather off then on, `--rate 20`: 15.7 -> 15.6 servers/s, 0.119 -> 0.120 CPU s a
boot, create -> ACTIVE p50/p99 1.64/3.14 -> 1.78/3.43 s, CreateInstance p99 714
-> 232 ms: no change at two boots a second per node (the gather is for bursts on
one node: four guests at once, bench/guest_bench.py).

Then three changes, each tree against the one before it, copies of their commits run
alternately on a quiet machine, `--rate 20` (two pairs each):
  remote groups as nftables sets on the nodes (a member list rewrites the group's set
    once per node, no port's chains): 0.101, 0.101 -> 0.093, 0.093 CPU s a boot;
    create -> ACTIVE p99 1.37, 1.13 -> 0.89, 0.89 s; CreateInstance p50/p99 38/127,
    38/118 -> 12/105, 25/102 ms; the agents' ensure_port_filter 21-23 -> 5-6 ms and
    ensure_group_members 45-54 -> 5 ms a run, 0.6 -> 0.4 CPU s an agent;
  creates in one round trip (quota records and flavors taken as the replica's last
    commit left them, request_id records as absent, the flavor compared at the
    commit): CreateInstance p50/p99 21/114, 31/466 -> 15/64, 13/44 ms (the service's
    own mean 23, 30 -> 13, 11 ms); 0.097, 0.095 -> 0.094, 0.092 CPU s a boot;
  the network's filter snapshots through store mirrors (what changed since the last
    read, not every port): network 3.8, 3.8 -> 3.6, 3.6 CPU s; no change beyond the
    noise elsewhere at 200 ports;
  a group's member addresses merged once for every snapshot that lists the same ones
    (the merge was 13 % of the network's CPU): network 3.6, 3.6 -> 3.5, 3.5 CPU s,
    CreateInstance p99 67, 88 -> 54, 53 ms.
The tree with all three, five runs in a row (quiet machine): saturation, 32 in
flight: 26.9, 25.8 servers/s, 0.072, 0.073 CPU s a boot (create -> ACTIVE p99 6.9, 7.0
s and CreateInstance p99 266, 284 ms: the backlog of 32 callers); paced 20/s: 19.6,
19.6 servers/s (a paced run of 200 cannot pass 200 / (10 s + the last boot)), create
-> ACTIVE p99 1.43, 1.58 s, CreateInstance p50 15, 17 ms and p99 370, 917 ms (84-516
ms in three more runs), 0.093 CPU s a boot: 1.9 of the 2 cores, 3-5 % idle (vmstat),
so the p99 is whatever the run's worst stall was; paced 10/s: CreateInstance p50/p99
6.3/28.1 ms, create -> ACTIVE p50/p99 0.12/0.41 s. Goals: >= 20 servers/s met at
saturation; create -> ACTIVE p99 < 2 s met at 20/s; CreateInstance p99 < 50 ms met at
10/s, not at 20/s, where the cores are full.

Then where the slow creates of a 20/s run fall: every CreateInstance over 30 ms came
in the first 2 s of the run (creates 8 to 40 of 200, one at 192), while the agents
and services logged in for their first calls (12 Authenticate a run, 269 ms mean,
argon2 on the shared cores). The same tree with ten boots made before the measured
ones: CreateInstance p50/p99 6.5/19.0 ms, create -> ACTIVE p99 0.24 s. Two changes,
each tree a copy of its commit, run alternately on a quiet machine, `--rate 20`:
  root disks made reserved (CreateRootDisk's device_name: the attachment made with the
    disk and begun by the outcome that records it made; no ReserveVolume, BeginAttach
    or operation save for the disk): 0.094, 0.095 -> 0.091, 0.091 CPU s a boot
    (storage 2.6 -> 2.2 s, compute 2.6 -> 2.4 s, etcd 4.2 -> 4.0-4.1 s); CreateInstance
    p99 44.9, 70.4 -> 163.5, 76.5, 42.3 ms (the first seconds' stalls either way);
  processes log in and connect to their peers as they start (ServiceClients.warm,
    and each agent's image downloads): no Authenticate in the boot window (identity
    0.4 -> 0.0 CPU s), the agents' ensure_volume 24.7 -> 3.0 ms mean; CreateInstance
    p50/p99 6.4/28.8, 6.9/32.6 ms; create -> ACTIVE p99 0.45, 0.43 s; 0.089 CPU s a boot.
The tree with both, six runs in a row (quiet machine): paced 20/s: 19.7-19.8 servers/s,
CreateInstance p50/p99 9.4/38.8, 10.9/36.6, 11.3/39.8 ms, create -> ACTIVE p50/p99
0.21/0.52, 0.26/0.51, 0.28/0.62 s, 0.093-0.095 CPU s a boot; saturation, 32 in
flight: 28.0, 27.0 servers/s, 0.069, 0.070 CPU s a boot; paced 10/s: CreateInstance
p50/p99 4.1/13.7 ms, create -> ACTIVE p99 0.15 s; raw Celery round trip p50 2.8-3.1
ms, 529-585 round trips/s; etcd 4,845-5,263 txn/s; deletes 33-36 servers/s. Goals met:
>= 20 servers/s (27-28 at saturation; a paced run of 200 at 20/s cannot pass ~19.8),
CreateInstance p99 < 50 ms and create -> ACTIVE p99 < 2 s at 20/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc.aio
from google.protobuf import field_mask_pb2, wrappers_pb2
from nubis.agent.v1 import tasks_pb2
from nubis.common.v1 import resource_pb2
from nubis.compute.v1 import (
    compute_service_pb2_grpc,
    flavor_pb2,
    instance_action_pb2,
    instance_pb2,
    instance_requests_pb2,
)
from nubis.identity.v1 import identity_pb2, identity_pb2_grpc
from nubis.network.v1 import network_pb2, network_service_pb2_grpc
from nubis.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from nubis.storage.v1 import image_pb2, storage_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from services.client.channel import CallPolicy, make_channel
from services.client.lab import runner, seed, state
from services.client.lab.components import agent_metrics_port
from services.common import quota, tasks
from services.common.logging import configure_logging
from services.common.settings import Settings
from services.common.store import Store
from services.common.task_sender import SenderConfig, TaskSender

Instance = instance_pb2.Instance
R = instance_requests_pb2
FLAVOR = "bench.nano"
GOALS = {"servers_per_s": 20.0, "create_p99_ms": 50.0, "active_p99_s": 2.0}
RAW_IN_FLIGHT = 32
"""Calls in flight for the raw Celery rate and the raw etcd rate."""
SETTLED = frozenset({Instance.ACTIVE, Instance.ERROR})
IDLE_SECONDS = 5.0
"""Seconds the lab's idle CPU (heartbeats, loops, the bench's watch) is measured before the
boots; that rate times the boots' wall time is taken off their CPU for "less idle"."""


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, nearest rank; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


@dataclass
class World:
    """The running lab and the bench's clients of it (as the lab's cloud admin)."""

    plan: Any
    lab: state.LabState
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return str(self.plan.ports.redis_url)

    @property
    def etcd_endpoint(self) -> str:
        return str(self.plan.ports.etcd_endpoint)

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self.channels:
            token = json.loads((self.plan.state_dir / "credentials.json").read_text())["token"]
            address = f"{self.plan.ports.host}:{self.plan.ports.services[service].port}"
            self.channels[service] = make_channel(address, token=token,
                                                  policy=CallPolicy(timeout=30.0))
        return self.channels[service]

    @property
    def compute(self) -> Any:
        return compute_service_pb2_grpc.ComputeServiceStub(self.channel("compute"))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


def start_lab(state_dir: Path, agents: int) -> World:
    """A lab of `agents` test-driver nodes on free ports, quiet logs (warnings only)."""
    os.environ["NUBIS_LOG_LEVEL"] = "warning"
    os.environ["NUBIS_LOG_JSON"] = "false"
    base = runner.find_free_base(start=27500)
    if base is None:
        raise RuntimeError("no free range of lab ports")
    plan = runner.make_plan(state_dir, nodes=agents, base_port=base)
    said = io.StringIO()
    started = time.perf_counter()
    result = asyncio.run(runner.up(plan, Console(file=said), ready_timeout=180.0))
    print(f"lab up in {time.perf_counter() - started:.1f}s: {len(result.lab.processes)} "
          f"processes, {agents} agents (test driver)", file=sys.stderr)
    return World(plan, result.lab)


async def prepare(world: World, agents: int) -> tuple[str, str, str]:
    """Unlimited quota for the admin project, the bench flavor, every node UP; the flavor,
    image and network ids to boot with."""
    identity = identity_pb2_grpc.IdentityServiceStub(world.channel("identity"))
    admin = json.loads((world.plan.state_dir / "credentials.json").read_text())
    project = admin.get("project_id") or (await identity.ListProjects(
        identity_pb2.ListProjectsRequest(filter="name=admin"))).projects[0].meta.id
    await identity.UpdateQuota(identity_pb2.UpdateQuotaRequest(
        quota=identity_pb2.Quota(project_id=project,
                                 limits={r: quota.UNLIMITED for r in quota.RESOURCES}),
        update_mask=field_mask_pb2.FieldMask(paths=["limits"])))
    flavor = await _ensure_flavor(world.compute)
    storage = storage_service_pb2_grpc.StorageServiceStub(world.channel("storage"))
    image = (await storage.ListImages(image_pb2.ListImagesRequest(
        filter=f"name={seed.IMAGE_NAME}"))).images[0].meta.id
    network = network_service_pb2_grpc.NetworkServiceStub(world.channel("network"))
    private = next(n for n in (await network.ListNetworks(network_pb2.ListNetworksRequest(
        filter=f"name={seed.PRIVATE_NETWORK}"))).networks if not n.shared).meta.id
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(world.channel("scheduler"))
    async with asyncio.timeout(60):
        while True:
            nodes = (await scheduler.ListNodes(scheduler_pb2.ListNodesRequest(
                page_size=1000))).nodes
            if sum(1 for n in nodes if n.state == scheduler_pb2.NODE_STATE_UP) >= agents:
                break
            await asyncio.sleep(0.5)
    return flavor, image, private


async def _ensure_flavor(compute: Any) -> str:
    found = (await compute.ListFlavors(flavor_pb2.ListFlavorsRequest(
        filter=f"name={FLAVOR}"))).flavors
    if found:
        return str(found[0].meta.id)
    made = await compute.CreateFlavor(flavor_pb2.CreateFlavorRequest(flavor=flavor_pb2.Flavor(
        meta=resource_pb2.ResourceMeta(name=FLAVOR), vcpus=1, ram_mb=64, disk_gb=1,
        is_public=True)))
    return str(made.meta.id)


# -- raw measurements --------------------------------------------------------------


async def _spread(calls: int, in_flight: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Seconds for `calls` calls of `op` with `in_flight` callers."""
    todo = iter(range(calls))

    async def caller() -> None:
        for i in todo:
            await op(i)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return time.perf_counter() - started


async def _paced(calls: int, rate: float,
                 op: Callable[[int, float], Coroutine[Any, Any, object]]) -> float:
    """The most seconds a call was sent after its planned time, `calls` calls of `op` sent
    open loop: call i at `i / rate` seconds from the first, each in a task of its own, none
    waiting for another's answer (`op` is given its planned time to measure from)."""
    began = time.perf_counter()
    sent: list[asyncio.Task[object]] = []
    late = 0.0
    for i in range(calls):
        planned = began + i / rate
        if (ahead := planned - time.perf_counter()) > 0:
            await asyncio.sleep(ahead)
        late = max(late, time.perf_counter() - planned)
        sent.append(asyncio.create_task(op(i, planned)))
    await asyncio.gather(*sent)
    return late


async def raw_celery(world: World, nodes: list[str], calls: int) -> dict[str, float]:
    """The no-op agent task through TaskSender: p50 alone, and the rate with 32 in flight."""
    sender = await TaskSender.connect(SenderConfig(broker_url=world.redis_url,
                                                   result_url=world.redis_url))
    try:
        async def ping(i: int) -> object:
            return await sender.send(nodes[i % len(nodes)], tasks.PING, tasks_pb2.PingRequest(),
                                     operation_id=tasks.OperationId("bench"), deadline=60)

        for i in range(len(nodes)):
            await ping(i)  # every agent answers before anything is timed
        alone = []
        for i in range(calls // 4):
            started = time.perf_counter()
            await ping(i)
            alone.append(time.perf_counter() - started)
        took = await _spread(calls, RAW_IN_FLIGHT, ping)
    finally:
        await sender.close()
    return {"celery_p50_ms": pct(alone, 50) * 1e3, "celery_per_s": calls / took}


async def raw_etcd(world: World, txns: int) -> dict[str, float]:
    """Create-if-absent transactions (the floor of any nubis create) with 32 in flight."""
    host, _, port = world.etcd_endpoint.rpartition(":")
    client = aetcd.Client(host=host, port=int(port))
    prefix = f"/bench-raw-{uuid.uuid4().hex[:8]}/"
    value = wrappers_pb2.Int64Value(value=1).SerializeToString()
    tx = client.transactions
    try:
        async def create(i: int) -> object:
            key = f"{prefix}{i}".encode()
            ok, _ = await client.transaction(compare=[tx.create(key) == 0],
                                             success=[tx.put(key, value)], failure=[])
            return ok

        took = await _spread(txns, RAW_IN_FLIGHT, create)
        await client.delete_prefix(prefix.encode())
    finally:
        await client.close()
    return {"etcd_txn_per_s": txns / took}


# -- the boots ---------------------------------------------------------------------


@dataclass
class Timeline:
    """What the bench saw of each server: when its create was sent and answered, and when
    the watch first showed each of its steps."""

    sent: dict[str, float] = field(default_factory=dict)
    create_latency: list[float] = field(default_factory=list)
    seen: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    settled: dict[str, float] = field(default_factory=dict)
    final: dict[str, instance_pb2.Instance] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reschedules: dict[str, set[str]] = field(default_factory=dict)
    send_late: float = 0.0
    """Paced: the most seconds a create was sent after its planned time."""

    def saw(self, instance: instance_pb2.Instance, at: float) -> None:
        server_id = instance.meta.id
        if server_id in self.settled:
            return
        if instance.fault.message.endswith("; rescheduled"):  # why its attempt failed
            self.reschedules.setdefault(instance.fault.message[:200], set()).add(server_id)
        step = Instance.State.Name(instance.state)
        if instance.task_state:
            step += "/" + Instance.TaskState.Name(instance.task_state).removeprefix(
                "TASK_STATE_").lower()
        steps = self.seen.setdefault(server_id, [])
        if not steps or steps[-1][1] != step:
            steps.append((at, step))
        if instance.state in SETTLED and not instance.task_id:
            self.settled[server_id] = at
            self.final[server_id] = instance
            self.changed.set()


async def watch(compute: Any, since: int, timeline: Timeline) -> None:
    stream = compute.WatchInstances(R.WatchInstancesRequest(
        options=resource_pb2.WatchOptions(start_revision=since)))
    try:
        async for event in stream:
            if event.type in (resource_pb2.EVENT_TYPE_ADDED, resource_pb2.EVENT_TYPE_MODIFIED):
                timeline.saw(event.instance, time.perf_counter())
    finally:
        stream.cancel()


async def poll(compute: Any, timeline: Timeline, interval: float) -> None:
    """A backstop for the watch: ListInstances now and then (and the only view without it)."""
    while True:
        await asyncio.sleep(interval)
        listed = (await compute.ListInstances(R.ListInstancesRequest(page_size=1000))).instances
        for instance in listed:
            if instance.meta.id in timeline.sent:
                timeline.saw(instance, time.perf_counter())


def stuck(timeline: Timeline) -> str:
    """How many servers were last seen in which step, when the wait gave up."""
    counts: dict[str, int] = {}
    for server_id in timeline.sent.keys() - timeline.settled.keys():
        last = timeline.seen[server_id][-1][1]
        counts[last] = counts.get(last, 0) + 1
    return (f"{sum(counts.values())} of {len(timeline.sent)} servers did not settle in time; "
            f"last seen: {counts}")


async def boot(world: World, shape: instance_pb2.Instance, args: argparse.Namespace,
               since: int, timeline: Timeline) -> float:
    """Create the servers into `timeline` and wait for all to settle; the wall time."""
    compute = world.compute
    watcher = asyncio.create_task(watch(compute, since, timeline))
    poller = asyncio.create_task(poll(compute, timeline, 2.0))
    await asyncio.sleep(0.5)  # the watch is open before the first create

    async def create(i: int, planned: float | None = None) -> object:
        instance = Instance()
        instance.CopyFrom(shape)
        instance.meta.name = f"bench-{i + 1}"
        started = time.perf_counter() if planned is None else planned
        made = await compute.CreateInstance(R.CreateInstanceRequest(
            instance=instance, request_id=str(uuid.uuid4())))
        timeline.create_latency.append(time.perf_counter() - started)
        timeline.sent[made.meta.id] = started
        timeline.saw(made, time.perf_counter())
        return made

    began = time.perf_counter()
    try:
        if args.rate:
            timeline.send_late = await _paced(args.servers, args.rate, create)
        else:
            await _spread(args.servers, args.concurrency, create)
        with contextlib.suppress(TimeoutError):  # what did not settle is reported as stuck
            async with asyncio.timeout(args.wait):
                while len(timeline.settled.keys() & timeline.sent.keys()) < args.servers:
                    timeline.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(timeline.changed.wait(), 1.0)
                    if watcher.done() and not poller.done():
                        poller.cancel()  # the watch ended: poll fast instead
                        poller = asyncio.create_task(poll(compute, timeline, 0.25))
    finally:
        for task in (watcher, poller):
            task.cancel()
        await asyncio.gather(watcher, poller, return_exceptions=True)
    return max(timeline.settled.values(), default=time.perf_counter()) - began


def watched_steps(timeline: Timeline) -> dict[str, list[float]]:
    """Seconds from each step's first sighting to the next step's, per step name."""
    found: dict[str, list[float]] = {"create sent -> first seen": []}
    for server_id, steps in timeline.seen.items():
        if server_id not in timeline.sent:
            continue
        found["create sent -> first seen"].append(steps[0][0] - timeline.sent[server_id])
        for (at, step), (after, _) in itertools.pairwise(steps):
            found.setdefault(step, []).append(after - at)
    return found


async def action_steps(compute: Any, ids: list[str],
                       faults: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Seconds per event of each server's `create` action, as the service timed them; the
    faults of its failed steps (a reschedule's cause) counted into `faults`."""
    found: dict[str, list[float]] = {}
    for server_id in ids:
        reply = await compute.ListInstanceActions(instance_action_pb2.ListInstanceActionsRequest(
            instance_id=server_id, page_size=100))
        for action in reply.actions:
            if action.action != "create":
                continue
            for event in action.events:
                if faults is not None and event.fault.reason:
                    cause = f"{event.name}: {event.fault.reason}: {event.fault.message[:160]}"
                    faults[cause] = faults.get(cause, 0) + 1
                if event.HasField("finish_time"):
                    took = (event.finish_time.ToNanoseconds()
                            - event.start_time.ToNanoseconds()) / 1e9
                    found.setdefault(event.name, []).append(took)
    return found


async def delete_all(compute: Any, ids: list[str], concurrency: int) -> str:
    """Deletes per second, until ListInstances shows none of them (or what is left)."""
    started = time.perf_counter()
    await _spread(len(ids), concurrency,
                  lambda i: compute.DeleteInstance(R.DeleteInstanceRequest(id=ids[i])))
    wanted = set(ids)
    left: dict[str, int] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(60.0, len(ids) * 0.5)):
            while True:
                listed = (await compute.ListInstances(R.ListInstancesRequest(
                    page_size=1000))).instances
                left = {}
                for i in listed:
                    if i.meta.id in wanted:
                        step = (f"{Instance.State.Name(i.state)}/"
                                f"{Instance.TaskState.Name(i.task_state).removeprefix('TASK_STATE_')}")
                        left[step] = left.get(step, 0) + 1
                if not left:
                    return f"{len(ids) / (time.perf_counter() - started):.1f} servers/s"
                await asyncio.sleep(0.25)
    return f"not all gone: {left}"


# -- memory ------------------------------------------------------------------------


def _proc_kib(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(world: World) -> dict[str, float]:
    """CPU seconds used so far by every lab process (with its children) and this bench."""
    found = {}
    for record in [*world.lab.processes, None]:
        name, pid = ("bench (client)", os.getpid()) if record is None else (record.name,
                                                                            record.pid)
        tree = [pid, *(_children(pid) if record is not None else [])]
        found[name] = sum(_cpu_seconds(p) for p in tree)
    return found


def memory(world: World) -> list[tuple[str, float, float]]:
    """(process, RSS MiB now, peak RSS MiB) of every lab process (with its children) and of
    this bench."""
    rows = []
    for record in [*world.lab.processes, None]:
        name, pid = ("bench (client)", os.getpid()) if record is None else (record.name,
                                                                            record.pid)
        tree = [pid, *(_children(pid) if record is not None else [])]
        rows.append((name, sum(_proc_kib(p, "VmRSS") for p in tree) / 1024,
                     sum(_proc_kib(p, "VmHWM") for p in tree) / 1024))
    return rows


# -- served times (the services' and agents' own /metrics) -------------------------

_TIMED = {"nubis_rpc_duration_seconds": "method", "nubis_task_sender_duration_seconds": "task",
          "nubis_agent_task_duration_seconds": "task"}
"""Histograms scraped: each one's (count, sum) by this label (outcome `ok` only, if any)."""


def _scrape(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    """(histogram, method or task) -> (count, sum of seconds) from one /metrics port."""
    found: dict[tuple[str, str], list[float]] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    for family in text_string_to_metric_families(text):
        label = _TIMED.get(family.name)
        if label is None:
            continue
        for sample in family.samples:
            if sample.labels.get("outcome", "ok") != "ok" or label not in sample.labels:
                continue
            slot = 0 if sample.name.endswith("_count") else 1 if sample.name.endswith(
                "_sum") else -1
            if slot >= 0:
                name = sample.labels[label].rsplit("/", 1)[-1]
                found.setdefault((family.name, name), [0.0, 0.0])[slot] += sample.value
    return {key: (count, total) for key, (count, total) in found.items()}


async def served(world: World) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
    """Every control service's RPC and task-sender times, and the agents' task times
    (summed over the agents), as counted so far."""
    ports = {name: p.metrics_port for name, p in world.plan.ports.services.items()}
    ports.update({f"agent-{i}": agent_metrics_port(world.plan, i)
                  for i in range(1, world.plan.nodes + 1)})
    scraped = await asyncio.gather(*(asyncio.to_thread(_scrape, port)
                                     for port in ports.values()))
    found: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
    for name, counted in zip(ports, scraped, strict=True):
        whose = found.setdefault("agents" if name.startswith("agent-") else name, {})
        for key, (count, total) in counted.items():
            had = whose.get(key, (0.0, 0.0))
            whose[key] = (had[0] + count, had[1] + total)
    return found


def served_since(before: dict[str, dict[tuple[str, str], tuple[float, float]]],
                 after: dict[str, dict[tuple[str, str], tuple[float, float]]],
                 servers: int) -> list[tuple[str, str, float, float]]:
    """(process, call, calls per server, mean ms) of what was served between two scrapes."""
    rows = []
    for process, counted in after.items():
        for (family, name), (count, total) in counted.items():
            had = before.get(process, {}).get((family, name), (0.0, 0.0))
            calls, seconds = count - had[0], total - had[1]
            if calls > 0:
                kind = {"nubis_rpc_duration_seconds": "rpc",
                        "nubis_task_sender_duration_seconds": "task sent"}.get(family, "task run")
                rows.append((process, f"{kind} {name}", calls / max(1, servers),
                             seconds / calls * 1e3))
    return sorted(rows, key=lambda row: (row[0], -row[2] * row[3]))


# -- the run and its table ---------------------------------------------------------


async def current_revision(world: World) -> int:
    store = await Store.connect([world.etcd_endpoint])
    try:
        return await store.revision()
    finally:
        await store.close()


async def measure(world: World, args: argparse.Namespace) -> dict[str, Any]:
    """Every number of the run; `boot_error` says why there are no boot numbers."""
    nodes = [f"node-{i}" for i in range(1, args.agents + 1)]
    flavor, image, network = await prepare(world, args.agents)
    met: dict[str, Any] = {"servers": args.servers, "agents": args.agents,
                           "concurrency": args.concurrency, "rate": args.rate,
                           "wait": args.wait}
    met.update(await raw_celery(world, nodes, args.celery_calls))
    met.update(await raw_etcd(world, args.etcd_txns))
    shape = Instance(flavor_id=flavor, image_id=image,
                     networks=[instance_pb2.NetworkRequest(network_id=network)])
    timeline = Timeline()
    served_before = await served(world)
    idle_before = cpu(world)
    await asyncio.sleep(IDLE_SECONDS)
    cpu_before = cpu(world)
    met["idle_cpu_per_s"] = sum(cpu_before.values()) - sum(idle_before.values())
    met["idle_cpu_per_s"] /= IDLE_SECONDS
    started = time.perf_counter()
    try:
        wall = await boot(world, shape, args, await current_revision(world), timeline)
    except grpc.aio.AioRpcError as exc:
        met["boot_error"] = f"CreateInstance failed ({exc.code().name}: {exc.details()})"
        met["memory"] = memory(world)
        return met
    ids = list(timeline.sent)
    met["boot_seconds"] = time.perf_counter() - started
    met["boot_cpu"] = {name: used - cpu_before.get(name, 0.0)
                       for name, used in cpu(world).items()}
    met["load_average"] = os.getloadavg()
    met["served"] = served_since(served_before, await served(world), len(ids))
    met["memory"] = memory(world)
    if timeline.sent.keys() - timeline.settled.keys():
        met["stuck"] = stuck(timeline)
        met["compute_log"] = runner.log_tail(world.plan.log_dir / "nubis-compute.log", 8)
    active = [timeline.settled[i] - timeline.sent[i] for i in ids
              if i in timeline.final and timeline.final[i].state == Instance.ACTIVE]
    faults: dict[str, int] = {}
    met.update({
        "active_count": len(active),
        "servers_per_s": len(active) / wall,
        "create_p50_ms": pct(timeline.create_latency, 50) * 1e3,
        "create_p99_ms": pct(timeline.create_latency, 99) * 1e3,
        "active_p50_s": pct(active, 50), "active_p99_s": pct(active, 99),
        "send_late_ms": timeline.send_late * 1e3,
        "errors": sorted({f"{f.fault.reason}: {f.fault.message}" for f in timeline.final.values()
                          if f.state == Instance.ERROR}),
        "error_count": sum(1 for f in timeline.final.values() if f.state == Instance.ERROR),
        "watched_steps": watched_steps(timeline),
        "action_steps": await action_steps(world.compute, ids, faults),
        "step_faults": {**faults, **{f"rescheduled: {cause}": len(servers) for cause, servers
                                     in timeline.reschedules.items()}},
    })
    met["deleted"] = await delete_all(world.compute, ids, args.concurrency)
    return met


def _steps_table(title: str, steps: dict[str, list[float]]) -> list[str]:
    lines = [f"{title:<44} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}"]
    for name, values in steps.items():
        if values:
            lines.append(f"  {name:<42} {len(values):>5} {pct(values, 50) * 1e3:>9.1f} "
                         f"{pct(values, 99) * 1e3:>9.1f} {statistics.fmean(values) * 1e3:>9.1f}")
    return lines


def report(met: dict[str, Any]) -> str:
    load = (f"paced at {met['rate']:g} servers/s offered (open loop: CreateInstance sent on "
            "a schedule, none waiting for another)" if met["rate"] else
            f"saturation: {met['concurrency']} CreateInstance in flight (closed loop)")
    lines = [f"compute bench: {met['servers']} servers, {met['agents']} agents (test driver), "
             f"{load}", ""]
    if "boot_error" in met:
        lines.append(f"boots not measured: {met['boot_error']}")
    else:
        if "stuck" in met:
            lines += [f"NOT ALL SETTLED within {met['wait']:g}s: {met['stuck']}",
                      "nubis-compute's log ends:", met["compute_log"], ""]
        lines += [
            f"{'servers ACTIVE':<44} {met['active_count']:>9} of {met['servers']}",
            f"{'end to end (first create -> last ACTIVE)':<44} {met['servers_per_s']:>9.1f} "
            "servers/s"
            f"   goal >= {GOALS['servers_per_s']:g}",
            f"{'CreateInstance latency p50 / p99':<44} {met['create_p50_ms']:>9.1f} / "
            f"{met['create_p99_ms']:.1f} ms   goal p99 < {GOALS['create_p99_ms']:g} ms",
            f"{'create -> ACTIVE p50 / p99':<44} {met['active_p50_s']:>9.2f} / "
            f"{met['active_p99_s']:.2f} s   goal p99 < {GOALS['active_p99_s']:g} s",
            *([f"{'paced: latest create sent after its time':<44} "
               f"{met['send_late_ms']:>9.1f} ms (latencies count from the planned time)"]
              if met["rate"] else []),
            f"{'servers in ERROR':<44} {met['error_count']:>9}  {'; '.join(met['errors'])[:300]}",
            f"{'deletes (until gone)':<44} {met['deleted']:>9}", "",
            *_steps_table("where the time goes, as watched (state/step)", met["watched_steps"]),
            *_steps_table("steps of the create actions (service's times)", met["action_steps"]),
            *[f"  failed step x{count}: {cause}" for cause, count in met["step_faults"].items()],
            "", f"{'served during the boots (own /metrics, ok only)':<52} {'per boot':>9} "
            f"{'mean ms':>9}",
            *[f"  {process:<10} {call[:40]:<40} {per:>9.2f} {mean:>9.1f}"
              for process, call, per, mean in met.get("served", []) if per >= 0.05],
        ]
    lines += ["", "beside them, same run:",
              f"{'raw Celery round trip (ping via TaskSender) p50':<44} "
              f"{met['celery_p50_ms']:>9.2f} ms",
              f"{f'raw Celery round trips, {RAW_IN_FLIGHT} in flight':<44} "
              f"{met['celery_per_s']:>9.0f} /s",
              f"{f'raw etcd create-if-absent txns, {RAW_IN_FLIGHT} in flight':<44} "
              f"{met['etcd_txn_per_s']:>9.0f} /s", "",
              f"{'load average (1, 5, 15 min) after the boots':<44} "
              + " ".join(f"{x:.2f}" for x in met.get("load_average", ())), "",
              f"{'process':<28} {'RSS MiB':>9} {'peak MiB':>9} {'boot CPU s':>11}"]
    used = met.get("boot_cpu", {})
    lines += [f"{name:<28} {now:>9.1f} {peak:>9.1f} {used.get(name, 0.0):>11.1f}"
              for name, now, peak in met["memory"]]
    if used:
        lines.append(f"{'all (CPU s per server ACTIVE)':<28} {'':>9} {'':>9} "
                     f"{sum(used.values()):>11.1f} "
                     f"({sum(used.values()) / max(1, met.get('active_count', 0)):.3f})")
        idle = met["idle_cpu_per_s"] * met["boot_seconds"]
        lines.append(f"{'  less idle (CPU s a server)':<28} {'':>9} {'':>9} "
                     f"{sum(used.values()) - idle:>11.1f} "
                     f"({(sum(used.values()) - idle) / max(1, met.get('active_count', 0)):.3f})"
                     f"   idle: {met['idle_cpu_per_s']:.2f} CPU s/s over "
                     f"{met['boot_seconds']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16,
                        help="CreateInstance (and DeleteInstance) calls in flight")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="paced (open loop): send CreateInstance at this many servers/s "
                        "on a schedule, whatever the answers, and measure the latencies at "
                        "that offered load (0: saturation, --concurrency in flight)")
    parser.add_argument("--celery-calls", type=int, default=400)
    parser.add_argument("--etcd-txns", type=int, default=2000)
    parser.add_argument("--wait", type=float, default=0.0,
                        help="seconds to wait for every server to settle (0: 1.5 s a server, "
                        "at least 120)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = parser.parse_args()
    args.wait = args.wait or max(120.0, args.servers * 1.5)
    configure_logging(Settings(log_level="warning", log_json=False))
    with tempfile.TemporaryDirectory(prefix="nubis-compute-bench-") as scratch:
        state_dir = Path(scratch) / "lab"
        try:
            world = start_lab(state_dir, args.agents)

            async def run() -> dict[str, Any]:
                try:
                    return await measure(world, args)
                finally:
                    await world.close()

            met = asyncio.run(run())
        finally:
            runner.down(state_dir, purge=True)
    print(report(met))
    if args.json:
        print(json.dumps({k: v for k, v in met.items() if k not in ("watched_steps",
                                                                     "action_steps")},
                         indent=2, default=str))
    sys.exit(1 if met.get("error_count") or "stuck" in met or "boot_error" in met else 0)


if __name__ == "__main__":
    main()
