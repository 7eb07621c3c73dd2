"""Three "hosts" as network namespaces on one switch, and a nubis cloud spread over them.

`Hosts` makes a controller and two node namespaces, each with one address on
a Linux bridge held by a fourth ("switch") namespace, plus a veth from the
test's own namespace to that switch so the test can dial the controller as
an operator's machine would. Every namespace carries the test's random tag
and is removed afterwards (with whatever still runs in it); the one device
made outside them, the test's veth, goes with its peer.

`start_cloud` runs the lab's own components (`services.client.lab`) with
`ip netns exec`: etcd, Redis and the five control services (reading the
shipped deploy/config/controller.toml, its addresses set in their
environment) in the controller, one agent per node namespace (kernel dataplane, libvirt test
driver) that reads the shipped deploy/config/compute-node.toml with the
controller's address (etcd, Redis, identity) and its own underlay address
(VXLAN tunnel endpoint) set in its environment, as an operator would edit
them, and reaches the controller over the switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from services.client.lab import components, config, runner, seed, state
from services.client.lab.components import ComponentSpec, LabPlan
from tests.functional.network import netns

ROLES = ("ctl", "a", "b")
"""The controller, then the two compute nodes, in address order (.1, .2, .3)."""

AGENT_HOSTS = {"nubis-agent-1": "a", "nubis-agent-2": "b"}
"""Which host runs which of the lab's agents."""

DEPLOY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "config"
"""The per-role configs the processes read, under the environment naming this test's addresses."""


def _free_subnet() -> str:
    """A 10.x.y.0/24 prefix ("10.x.y") no route of this machine's namespace mentions."""
    routes = netns.run("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        prefix = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise AssertionError("no free 10.x.y.0/24 for the underlay")


@dataclass
class Hosts:
    """The namespaces of one test: host name -> namespace, and their underlay addresses."""

    spaces: netns.Namespaces
    prefix: str
    namespaces: dict[str, str] = dataclasses.field(default_factory=dict)
    operator_link: str = ""

    def address(self, role: str) -> str:
        return f"{self.prefix}.{ROLES.index(role) + 1}"

    @classmethod
    def make(cls, workdir: Path) -> Hosts:
        hosts = cls(netns.Namespaces(workdir), _free_subnet())
        try:
            hosts._wire()
        except BaseException:
            hosts.remove()
            raise
        return hosts

    def _wire(self) -> None:
        spaces, tag = self.spaces, self.spaces.tag
        switch = spaces.make("mn-sw")
        bridge = f"nmb{tag[2:]}"
        netns.run("ip", "-n", switch, "link", "add", bridge, "type", "bridge")
        netns.run("ip", "-n", switch, "link", "set", bridge, "up")
        for role in ROLES:
            host = spaces.make(f"mn-{role}")
            self.namespaces[role] = host
            spaces.link(host, "uplink", switch, f"p-{role}")
            netns.run("ip", "-n", switch, "link", "set", f"p-{role}", "master", bridge)
            netns.run("ip", "-n", host, "addr", "add", f"{self.address(role)}/24",
                      "dev", "uplink")
        # The test's own way in (its peer is in the switch, so deleting the switch removes it).
        self.operator_link = f"nmo{tag[2:]}"
        netns.run("ip", "link", "add", self.operator_link, "type", "veth", "peer", "name",
                  "p-operator", "netns", switch)
        netns.run("ip", "-n", switch, "link", "set", "p-operator", "master", bridge)
        netns.run("ip", "-n", switch, "link", "set", "p-operator", "up")
        netns.run("ip", "addr", "add", f"{self.prefix}.254/24", "dev", self.operator_link)
        netns.run("ip", "link", "set", self.operator_link, "up")

    def remove(self) -> None:
        if self.operator_link:
            netns.run("ip", "link", "del", self.operator_link, check=False)
        self.spaces.remove_all()


def _in_namespace(spec: ComponentSpec, hosts: Hosts, state_dir: Path) -> ComponentSpec:
    """The lab's spec of one process, run inside the namespace of the host it belongs on.

    nubis processes read deploy/'s config of their role, with what an operator
    edits there (addresses, the password file, paths) given in the environment.
    """
    role = AGENT_HOSTS.get(spec.name, "ctl")
    namespace = hosts.namespaces[role]
    env = dict(spec.env)
    password = str(state_dir / config.SERVICE_PASSWORD_FILE)
    if spec.name in AGENT_HOSTS:
        env.update({
            "NUBIS_CONFIG": str(DEPLOY_CONFIG / "compute-node.toml"),
            "NUBIS_IDENTITY__ADVERTISE_HOST": hosts.address("ctl"),
            "NUBIS_SERVICE_AUTH__PASSWORD_FILE": password,
            "NUBIS_AGENT__DATAPLANE": "kernel",
            # DHCP namespaces are named after it: two "hosts" on one machine never share one.
            "NUBIS_AGENT__DATAPLANE_NETNS": namespace,
            "NUBIS_AGENT__TUNNEL_ADDRESS": hosts.address(role),
            "NUBIS_AGENT__AVAILABILITY_ZONE": f"zone-{role}",
            "NUBIS_AGENT__NETWORK_NODE": "false",
        })
    elif spec.uses_config:  # a control service (etcd and Redis read no nubis config)
        env.update({
            "NUBIS_CONFIG": str(DEPLOY_CONFIG / "controller.toml"),
            # Every service's (a service dials identity at identity's).
            **{f"NUBIS_{service.upper()}__ADVERTISE_HOST": hosts.address("ctl")
               for service in components.CONTROL_SERVICES},
            "NUBIS_SERVICE_AUTH__PASSWORD_FILE": password,
            "NUBIS_STORAGE__IMAGE_DIR": str(state_dir / "data" / "images"),
        })
    return dataclasses.replace(spec, argv=["ip", "netns", "exec", namespace, *spec.argv],
                               env=env)


async def start_cloud(hosts: Hosts, state_dir: Path) -> LabPlan:
    """Start the cloud over `hosts`; its processes are recorded in `state_dir` (lab.json).

    The admin is bootstrapped once identity is ready and the lab image registered, as
    `nubis lab up` does; `runner.down(state_dir)` stops exactly what was started.
    """
    plan = runner.make_plan(state_dir, nodes=len(AGENT_HOSTS), host=hosts.address("ctl"))
    config.write_config(plan)
    specs = [_in_namespace(spec, hosts, plan.state_dir) for spec in components.components(plan)]
    lab = state.LabState(state_dir=str(plan.state_dir), host=plan.ports.host,
                         created=time.time(), nodes=plan.nodes, base_port=None, tls=False,
                         driver=plan.driver)
    ctx = components.PostStartContext(plan=plan, console=Console(file=io.StringIO()))
    # The bootstrap once identity is ready, before the services and agents that log in as
    # the service user start (their logins, refused before it, would get it throttled).
    await runner._start_all(plan, specs, lab, ready_timeout=90, context=ctx,
                            after_ready=components.after_ready_steps())
    seed.seed_image(ctx)
    return plan


def kill_leftovers(state_dir: Path) -> None:
    """SIGKILL every process whose command line names `state_dir`, a directory only this
    test's processes use (a daemon an agent started outlives the agent otherwise)."""
    wanted = str(state_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)


def tag() -> str:
    """A short random tag for names made through the API."""
    return uuid.uuid4().hex[:6]
