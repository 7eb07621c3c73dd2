"""The registry of lab components: every process `nubis lab up` starts, in dependency order.

A component is a spec (name, argv, extra environment, readiness check,
dependencies). `components()` returns the specs of one lab; a control service
or the agent is listed only when its `services/<svc>/main.py` exists, so the
lab always runs every nubis service that exists so far. `after_ready_steps()`
names what runs as soon as one component is ready, before anything that depends on
it starts (the admin and service users, once identity serves); `post_start_steps()`
lists what runs once everything is ready (the seeding).
"""

from __future__ import annotations

import enum
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from services.client.lab import daemons, qemu
from services.common.settings import Settings, TlsSettings

# The package root, to test whether a service's entry module exists yet.
_SERVICES_DIR = Path(__file__).resolve().parent.parent.parent

# Where the lab keeps the cloud admin's name and password (mode 0600).
ADMIN_CREDENTIALS = "admin-credentials.json"

# The Redis password of a TLS lab, and the redis.conf that hands it to redis-server
# (a password on the command line would show in `ps`).
REDIS_PASSWORD_FILE = "redis-password"
REDIS_CONFIG_FILE = "redis.conf"
# The certificate the agents present to the services (pki names it like a service's).
AGENT_CERT = "agent"

# Control services in the order of their default ports (7500..7504).
CONTROL_SERVICES = ("identity", "compute", "storage", "network", "scheduler")

# Offsets from --base-port for the third-party daemons; the control services
# take base+0..base+4 and their metrics base+100..base+104, like the defaults.
_ETCD_OFFSET = 50
_REDIS_OFFSET = 52
_METRICS_OFFSET = 100
# The agents' metrics ports start this far past the first service's (7610, 7611, ..).
_AGENT_METRICS_GAP = 10


class Readiness(enum.Enum):
    """How the runner decides a component is up."""

    TCP = "tcp"  # something accepts connections on its port
    HTTP = "http"  # GET http://host:port<health_path> answers 200 (etcd's /health)
    GRPC = "grpc"  # grpc.health.v1 reports SERVING on its port
    ALIVE = "alive"  # no port: the process is still running after a short settle time


@dataclass(frozen=True)
class ServicePorts:
    """Where one control service listens in a lab."""

    port: int
    metrics_port: int


@dataclass(frozen=True)
class LabPorts:
    """Every port a lab binds; `all()` is what must be free before `up`."""

    host: str
    etcd_client: int
    etcd_peer: int
    redis: int
    services: dict[str, ServicePorts]

    @classmethod
    def defaults(cls, host: str = "127.0.0.1") -> LabPorts:
        """The default ports of Settings (7500.., metrics +100), etcd 2379/2380, Redis 6379."""
        services = {}
        for name in CONTROL_SERVICES:
            endpoint = Settings.model_fields[name].get_default(call_default_factory=True)
            port = int(endpoint.port)
            services[name] = ServicePorts(port, int(endpoint.metrics_port or port + 100))
        return cls(host, 2379, 2380, 6379, services)

    @classmethod
    def from_base(cls, base: int, host: str = "127.0.0.1") -> LabPorts:
        """Ports laid out from `base`: services base+0.., metrics base+100.., etcd base+50."""
        services = {
            name: ServicePorts(base + i, base + _METRICS_OFFSET + i)
            for i, name in enumerate(CONTROL_SERVICES)
        }
        return cls(host, base + _ETCD_OFFSET, base + _ETCD_OFFSET + 1, base + _REDIS_OFFSET,
                   services)

    def all(self) -> list[int]:
        ports = [self.etcd_client, self.etcd_peer, self.redis]
        for service in self.services.values():
            ports += [service.port, service.metrics_port]
        return ports

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.host}:{self.etcd_client}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis}/0"


@dataclass(frozen=True)
class LabPlan:
    """What the specs are built from: the state directory, ports and number of nodes."""

    state_dir: Path
    ports: LabPorts
    nodes: int
    config_file: Path
    base_port: int | None = None
    """The --base-port the ports were laid out from (None: the default ports)."""
    tls: bool = False
    """Every gRPC hop with mutual TLS (certificates of `pki`) and Redis with a password."""
    driver: str = "test"
    """The agents' libvirt: 'test' (test:///default) or 'qemu' (a lab-private libvirtd)."""
    accel: str = ""
    """How a qemu lab's guests run: 'kvm' or 'tcg' (`qemu.accelerator`, probed by `up`)."""

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def redis_password_file(self) -> Path:
        """The Redis password of a TLS lab (mode 0600; redis.conf holds it for redis-server)."""
        return self.state_dir / REDIS_PASSWORD_FILE

    @property
    def redis_config_file(self) -> Path:
        return self.state_dir / REDIS_CONFIG_FILE

    def redis_url(self) -> str:
        """The URL every Celery client of the lab uses: with the password in a TLS lab."""
        if not self.tls:
            return self.ports.redis_url
        password = self.redis_password_file.read_text().strip()
        return f"redis://:{password}@{self.ports.host}:{self.ports.redis}/0"


@dataclass(frozen=True)
class ComponentSpec:
    """One process of the lab."""

    name: str
    argv: list[str]
    readiness: Readiness
    port: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    health_path: str = "/health"
    # The lab's config TOML is handed to nubis processes, not to etcd or Redis.
    uses_config: bool = True


@dataclass(frozen=True)
class PostStartContext:
    """What a post-start step gets: the plan, the running lab's endpoints, and a console."""

    plan: LabPlan
    console: Console

    def endpoint(self, service: str) -> str:
        """host:port of a control service of this lab, e.g. endpoint("identity")."""
        return f"{self.plan.ports.host}:{self.plan.ports.services[service].port}"

    def tls(self) -> TlsSettings | None:
        """How to dial the lab's services (None: plaintext)."""
        from services.client.lab import config  # config imports this module: import when run

        return config.client_tls(self.plan.state_dir, self.plan.tls)


PostStartStep = Callable[[PostStartContext], None]


def service_exists(service: str) -> bool:
    """True once `services/<service>/main.py` has been written."""
    return (_SERVICES_DIR / service / "main.py").is_file()


def components(plan: LabPlan) -> list[ComponentSpec]:
    """The specs of one lab: etcd, Redis, existing control services, then agents."""
    ports = plan.ports
    specs = [
        ComponentSpec(
            name="etcd",
            argv=daemons.etcd_argv(plan.data_dir / "etcd", ports.etcd_client, ports.etcd_peer,
                                   name="lab", host=ports.host),
            # etcd listens before its backend is open and may still die (a corrupt
            # data dir); /health answers 200 only once it can serve.
            readiness=Readiness.HTTP, port=ports.etcd_client,
            ports={"client": ports.etcd_client, "peer": ports.etcd_peer}, uses_config=False,
            # A lab's few hundred keys: Go's collector runs at half the live heap grown
            # instead of all of it, some 1.5 MiB less resident. Not a quarter (3 MiB): under
            # boots etcd allocates fast and its collector's CPU grows as GOGC shrinks (100
            # boots: etcd 3.1-3.5 CPU s at 25, 1.6-2.8 at 50, 2.0-2.2 at 100).
            env={"GOGC": "50"},
        ),
        ComponentSpec(
            name="redis",
            argv=daemons.redis_argv(plan.data_dir / "redis", ports.redis, host=ports.host,
                                    config_file=plan.redis_config_file if plan.tls else None),
            readiness=Readiness.TCP, port=ports.redis, ports={"redis": ports.redis},
            uses_config=False,
        ),
    ]
    for service in CONTROL_SERVICES:
        if service_exists(service):
            specs.append(_control_service(service, plan))
    if service_exists("agent"):
        if plan.driver == qemu.QEMU and plan.nodes:
            specs.append(ComponentSpec(name=qemu.LIBVIRTD, argv=qemu.libvirtd_argv(plan.state_dir),
                                       readiness=Readiness.ALIVE, uses_config=False))
        specs += [_agent(plan, index) for index in range(1, plan.nodes + 1)]
    return specs


def _tls_env(plan: LabPlan, name: str) -> dict[str, str]:
    """The certificate a process presents, in a TLS lab (the TOML's [tls] names the CA)."""
    if not plan.tls:
        return {}
    from services.client.lab import pki  # cryptography is loaded only by TLS labs

    own = pki.paths(plan.state_dir, name)
    return {"NUBIS_TLS__CERT_FILE": str(own.cert), "NUBIS_TLS__KEY_FILE": str(own.key)}


def _control_service(service: str, plan: LabPlan) -> ComponentSpec:
    own = plan.ports.services[service]
    depends = ["etcd", "redis"]
    # Identity signs the tokens every other service verifies, so it comes first.
    if service != "identity" and service_exists("identity"):
        depends.append("nubis-identity")
    return ComponentSpec(
        name=f"nubis-{service}",
        # services.launch runs services.<service>.main without what no service uses.
        argv=[sys.executable, "-m", "services.launch", service],
        readiness=Readiness.GRPC, port=own.port,
        ports={"grpc": own.port, "metrics": own.metrics_port},
        env={
            f"NUBIS_{service.upper()}__PORT": str(own.port),
            f"NUBIS_{service.upper()}__METRICS_PORT": str(own.metrics_port),
            **_tls_env(plan, service),
        },
        depends_on=tuple(depends),
    )


def node_name(index: int) -> str:
    """The node name of the lab's agent `index` (from 1)."""
    return f"node-{index}"


def agent_metrics_port(plan: LabPlan, index: int) -> int:
    """The /metrics port of agent `index` (from 1): past the services', 7610.. by default."""
    return plan.ports.services[CONTROL_SERVICES[0]].metrics_port + _AGENT_METRICS_GAP + index - 1


def _agent(plan: LabPlan, index: int) -> ComponentSpec:
    node = node_name(index)
    return ComponentSpec(
        name=f"nubis-agent-{index}",
        # The node name on the command line makes each agent recognisable in `ps`.
        argv=[sys.executable, "-m", "services.launch", "agent", "--node-name", node],
        readiness=Readiness.ALIVE, ports={"metrics": agent_metrics_port(plan, index)},
        env={
            "NUBIS_AGENT__LIBVIRT_URI": "test:///default",
            # The first node hosts the lab's routers (namespaces with SNAT and floating IPs).
            "NUBIS_AGENT__NETWORK_NODE": "true" if index == 1 else "false",
            "NUBIS_AGENT__METRICS_PORT": str(agent_metrics_port(plan, index)),
            # Its own files (dnsmasq hosts, leases), its pool and its image cache inside
            # the lab, apart from other labs' (and gone with `down --purge`).
            "NUBIS_AGENT__STATE_DIR": str(plan.data_dir / "agents" / node),
            "NUBIS_AGENT__STORAGE_POOL_PATH": str(plan.data_dir / "pools" / node),
            "NUBIS_AGENT__IMAGE_CACHE_PATH": str(plan.data_dir / "image-cache" / node),
            # One console log directory for every node, as in a cloud (migration keeps paths).
            "NUBIS_AGENT__CONSOLE_LOG_DIR": str(plan.data_dir / "console"),
            **_tls_env(plan, AGENT_CERT),
            **(qemu.agent_env(plan.state_dir, node, plan.accel or qemu.TCG)
               if plan.driver == qemu.QEMU else {}),
        },
        # After identity: the bootstrap run once it serves makes the service user agents
        # fetch images with.
        depends_on=("etcd", "redis", "nubis-identity",
                    *((qemu.LIBVIRTD,) if plan.driver == qemu.QEMU else ())),
    )


# A qemu lab (or any, with NUBIS_LAB_GUEST=1; none with NUBIS_LAB_GUEST=0) also builds the
# nubis guest from Debian's packages (kernel and busybox, fetched with apt-get download) and
# registers it: see lab/guest_seed.py.
GUEST_ENV = "NUBIS_LAB_GUEST"


def guest_wanted(plan: LabPlan) -> bool:
    """Whether `up` builds and registers the nubis guest."""
    chosen = os.environ.get(GUEST_ENV, "")
    return chosen == "1" or (chosen != "0" and plan.driver == qemu.QEMU)


def post_start_steps() -> list[PostStartStep]:
    """Steps run in order once every component is ready (e.g. seed an image).

    A step that raises fails `up`, which then stops the whole lab: a lab whose
    bootstrap failed is not one to hand to a user. With the admin made (an
    `after_ready_steps` step), the lab registers an image (and, in a qemu lab or with
    NUBIS_LAB_GUEST=1, the nubis guest), makes the default networks, names the flavors
    (`seed`) and writes the defaults of `nubis server create` (`cli_defaults`).
    """
    if not service_exists("identity"):
        return []
    from services.client.lab import seed  # seed needs this module's types: import when run

    steps: list[PostStartStep] = []
    if service_exists("storage"):
        steps.append(seed.seed_image)
        from services.client.lab import guest_seed

        steps.append(guest_seed.seed_guest)  # where guest_wanted(plan)
    if service_exists("network"):
        steps.append(seed.seed_networks)
    if service_exists("compute"):
        from services.client.lab import cli_defaults

        steps += [seed.seed_flavors, cli_defaults.seed_defaults]
    return steps


def after_ready_steps() -> dict[str, list[PostStartStep]]:
    """Steps run once the named component is ready, before the components that depend on it.

    Identity alone comes up before the bootstrap: the other services and the agents log
    in with the service user as they start, so they start only once it exists
    (started earlier, their refused logins would get the service credential throttled).
    """
    if not service_exists("identity"):
        return {}
    return {"nubis-identity": [bootstrap_admin]}


def bootstrap_admin(ctx: PostStartContext) -> None:
    """Make the cloud admin; keep its credentials and log the CLI in as it.

    The admin's name and password stay in admin-credentials.json, which
    `nubis login` never touches, so logging in as another user does not lose
    the way back; credentials.json (what the CLI sends) starts as a copy.
    """
    from services.client.lab import config  # config imports this module: import when run

    target = ctx.plan.state_dir / ADMIN_CREDENTIALS
    argv = [sys.executable, "-m", "services.identity.manage", "bootstrap",
            "--write-credentials", str(target), "--identity", ctx.endpoint("identity")]
    done = subprocess.run(argv, env=config.child_environment(ctx.plan), capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"admin bootstrap failed: {done.stderr.strip()[-2000:]}")
    # The CLI's session: the admin's token, without the password.
    session = {k: v for k, v in json.loads(target.read_text()).items() if k != "password"}
    descriptor = os.open(ctx.plan.state_dir / "credentials.json",
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(session, handle, indent=2)
    ctx.console.print(f"admin credentials: {target} (nubis commands use them from here)")
