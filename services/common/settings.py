"""Typed settings for every nubis process: ``NUBIS_*`` environment over a TOML file.

One `Settings` object is built at process start and passed in; nothing reads
the environment after that. Nested fields use ``__`` in the environment:
``NUBIS_ETCD__ENDPOINTS='["127.0.0.1:2379"]'``, ``NUBIS_IDENTITY__PORT=7500``.
The TOML file is named by ``NUBIS_CONFIG`` (or passed explicitly).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from services.common import errors


class EtcdSettings(BaseModel):
    """How to reach etcd, the single source of truth."""

    endpoints: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:2379"],
        description="host:port of every etcd member; the store fails over between them.",
    )
    timeout: float = Field(5.0, description="Seconds one etcd call may take before failover.")
    prefix: str = Field("/nubis", description="Key prefix under which all nubis state lives.")
    health_interval: float = Field(
        2.0, description="Seconds between a service's checks that etcd answers; the service "
        "reports NOT_SERVING while it does not."
    )


# Bind addresses that mean "every interface": nobody can dial them from elsewhere.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets (``[fd00::1]:7500``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ServiceEndpoint(BaseModel):
    """Where one gRPC service listens, and the address it publishes for clients to dial."""

    host: str = Field(
        "127.0.0.1", description="Address to bind; 0.0.0.0 (or ::) binds every interface."
    )
    port: int = Field(0, description="gRPC port; 0 binds a free port (tests).")
    advertise_host: str = Field(
        "", description="Host name or address other processes dial, published in the catalog. "
        "Empty: `host`, unless `host` binds every interface; then this machine's host name "
        "(which other machines must resolve; set advertise_host where they cannot). "
        "0.0.0.0 and :: are never published."
    )
    metrics_port: int | None = Field(
        None, description="Prometheus /metrics port; None disables it, 0 picks a free port."
    )

    @field_validator("advertise_host")
    @classmethod
    def _dialable(cls, value: str) -> str:
        if value and value in WILDCARD_HOSTS:
            raise ValueError(f"{value} binds every interface; advertise a name or address "
                             "other processes can dial")
        return value

    def advertised_host(self) -> str:
        """The host clients should dial: advertise_host, else host, else this machine's name."""
        if self.advertise_host:
            return self.advertise_host
        if self.host in WILDCARD_HOSTS:
            return socket.gethostname()
        return self.host

    def advertised_address(self, port: int | None = None) -> str:
        """``host:port`` clients should dial (`port`: the bound one, when the setting is 0)."""
        return host_port(self.advertised_host(), self.port if port is None else port)


class StorageSettings(ServiceEndpoint):
    """nubis-storage: where it listens, and where and how it keeps image bytes."""

    image_dir: str = Field(
        "/var/lib/nubis/images", description="Directory of the image store's directory backend: "
        "one file per ACTIVE image (named by its id) and a `staging` directory for uploads in "
        "progress; created if missing. Several storage replicas must share it (one "
        "filesystem, e.g. NFS or CephFS, mounted at this path on each), since any replica may "
        "serve a download of an image another one stored."
    )
    max_image_bytes: int = Field(
        1 << 40, gt=0, description="Largest image an upload may store, in bytes (Glance's "
        "image_size_cap; default 1 TiB). A stream growing past it is refused at that byte."
    )
    download_chunk_bytes: int = Field(
        1 << 20, gt=0, le=1 << 20, description="Bytes per DownloadImage message (at most 1 MiB)."
    )
    upload_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds an UploadImage stream may send nothing before the "
        "upload is abandoned (no bytes kept, the image back in QUEUED)."
    )
    upload_lease_ttl: int = Field(
        15, gt=0, description="Seconds an upload's etcd record outlives a storage replica "
        "that died streaming it; after that another upload of the image may start."
    )
    qemu_img: str = Field(
        "qemu-img", description="The qemu-img binary that inspects uploaded bytes "
        "(`qemu-img info --output=json`) to check the declared disk format."
    )
    inspect_timeout: float = Field(
        60.0, gt=0, description="Seconds `qemu-img info` may take on one uploaded image."
    )
    sync_images: bool = Field(
        True, description="fsync an uploaded image (written past the page cache, O_DIRECT, "
        "where the filesystem allows; else written back as it streams in) and its "
        "directory before it becomes ACTIVE, so a crash right after never leaves an ACTIVE "
        "image with lost bytes. False: uploads end in the page cache, as fast as `cp`."
    )
    operation_lease_ttl: int = Field(
        10, ge=2, description="Seconds a replica's operation lease outlives the replica; after "
        "that another replica (or the restarted one) adopts the volume and snapshot operations "
        "it was running."
    )
    operation_scan_interval: float = Field(
        5.0, gt=0, description="Seconds between two looks for operations whose replica is gone."
    )
    operation_max_unanswered: int = Field(
        3, ge=1, description="Agent tasks of one operation that may go unanswered (node down) "
        "before its volume or snapshot goes to ERROR."
    )


class ComputeSettings(ServiceEndpoint):
    """nubis-compute: where it listens, and how it runs, retries and adopts instance operations."""

    build_retries: int = Field(
        3, ge=0, description="Times a build that failed on one node is rescheduled onto another "
        "node (Nova's reschedule) before the instance goes to ERROR; 0 never reschedules."
    )
    operation_lease_ttl: int = Field(
        10, ge=2, description="Seconds a replica's operation lease outlives the replica; after "
        "that another replica (or the restarted one) adopts the instance operations it was "
        "running and runs them on from their step."
    )
    operation_scan_interval: float = Field(
        5.0, gt=0, description="Seconds between two looks for instance operations whose "
        "replica is gone."
    )
    operation_max_unanswered: int = Field(
        3, ge=1, description="Agent tasks of one instance operation that may go unanswered "
        "(node down) before the operation fails."
    )
    node_check_interval: float = Field(
        5.0, gt=0, description="Seconds between two looks at the state of a node whose agent "
        "an operation awaits (one GetNode per node per interval, shared by the operations): "
        "a node gone DOWN is waited on no longer."
    )
    power_sync_interval: float = Field(
        60.0, gt=0, description="Seconds between two power-state syncs: each node's domains "
        "are asked of its agent and their real power state written into the instances."
    )
    volume_wait_timeout: float = Field(
        300.0, gt=0, description="Seconds a build waits for its root disk to become AVAILABLE "
        "before the attempt fails."
    )
    default_flavors: bool = Field(
        True, description="Create the default flavor set (m1.tiny ... m1.xlarge) when the "
        "service starts and no default set was ever made."
    )


class TlsSettings(BaseModel):
    """Optional TLS / mutual TLS for gRPC servers and clients."""

    enabled: bool = Field(False, description="Serve and dial with TLS.")
    cert_file: str | None = Field(None, description="PEM certificate of this process.")
    key_file: str | None = Field(None, description="PEM private key of this process.")
    ca_file: str | None = Field(None, description="PEM CA bundle used to verify peers.")
    require_client_cert: bool = Field(False, description="Demand client certificates (mTLS).")


class AgentSettings(BaseModel):
    """One node's agent: which node it is and what it reports about itself."""

    node_name: str = Field("", description="Node name; empty uses the host name.")
    libvirt_uri: str = Field("test:///default", description="libvirt connection URI.")
    availability_zone: str = Field("nova", description="Availability zone the node reports.")
    traits: list[str] = Field(
        default_factory=list, description="Extra traits the node reports (e.g. CUSTOM_SSD)."
    )
    storage_pool: str = Field(
        "nubis", description="The node's libvirt `dir` pool: volumes and cached images live "
        "in it, its size is the node's disk; empty: the first running pool (nothing ensured)."
    )
    storage_pool_path: str = Field(
        "/var/lib/nubis/pools/nubis", description="Directory of the node's pool: the agent "
        "defines, builds (the directory made if missing) and starts the pool at start."
    )
    image_cache_path: str = Field(
        "", description="Directory where images being fetched are downloaded and checked "
        "before they join the pool (the same filesystem as the pool makes that a rename); on "
        "the test driver, which keeps no files, the cached bytes stay here. Empty: "
        "/var/lib/nubis/image-cache/<node name>, so agents sharing a host never share it."
    )
    lease_ttl: int = Field(10, description="Seconds the node key outlives a silent agent.")
    facts_interval: float = Field(
        60.0, gt=0, description="Seconds between re-reads of the node's capacity from libvirt; a "
        "change (a resized or stopped pool) is published at once."
    )
    tunnel_address: str = Field(
        "127.0.0.1", description="This node's VXLAN tunnel endpoint: the local address other "
        "nodes send the encapsulated traffic of nubis networks to."
    )
    network_node: bool = Field(
        False, description="True if the node may host routers (namespaces with SNAT/DNAT)."
    )
    dataplane: Literal["", "kernel", "recording"] = Field(
        "", description="Network dataplane: 'kernel' (Linux bridges, vxlan, dnsmasq, nftables; "
        "needs root), 'recording' (records what it would do), or '' to pick by the libvirt "
        "driver (test -> recording, anything else -> kernel)."
    )
    port_filter: Literal["nftables", "nwfilter"] = Field(
        "nftables", description="How security groups and anti-spoofing are enforced on the "
        "node's ports: 'nftables' (each port's chains in the bridge's namespace, loaded by the "
        "agent before the guest starts) or 'nwfilter' (a libvirt nwfilter referenced by the "
        "domain's interface, instantiated by libvirt when the guest starts)."
    )
    dataplane_netns: str = Field(
        "", description="Network namespace the kernel dataplane makes its devices and runs "
        "dnsmasq in; empty: the host's own."
    )
    state_dir: str = Field(
        "", description="Directory of the agent's own files (each network's dnsmasq pid, "
        "hosts, options, leases and log); empty: /var/lib/nubis/agents/<node name>."
    )
    console_log_dir: str = Field(
        "/var/lib/nubis/console", description="Directory of the guests' serial console logs, "
        "one file per domain (<domain name>.log, written by libvirt, read by the console_log "
        "task). The same on every node (domain names are unique in the cloud), so a domain "
        "migrated live keeps logging to the same path on its new node; empty: "
        "<state_dir>/console."
    )
    virt_type: Literal["", "kvm", "qemu"] = Field(
        "", description="libvirt domain type of new guests: 'kvm', 'qemu' (TCG, where KVM "
        "cannot run guests) or '' for kvm where libvirt's capabilities offer it, else qemu "
        "(the test driver's own type on test:///default)."
    )
    tcg_vcpu_scheduler: Literal["", "batch", "idle"] = Field(
        "", description="Linux scheduling class of the vCPU threads of TCG guests (domain type "
        "qemu): 'idle' runs them only on CPU nothing else wants, so emulated guests booting "
        "never slow libvirt's start of the next one or the control plane; 'batch' only stops "
        "them preempting; '' leaves them as any thread. KVM guests are never changed. The "
        "qemu lab sets idle under TCG."
    )
    concurrency: int = Field(4, description="Celery worker threads.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the agent's Prometheus /metrics (task counts by "
        "outcome, latency, in flight; docs/metrics.md); 0: no metrics endpoint."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the /metrics endpoint binds; 0.0.0.0 (or ::) lets a "
        "Prometheus on another machine scrape it."
    )
    task_time_limit: int = Field(600, description="Hard time limit of any task, in seconds.")
    task_soft_time_limit: int = Field(540, description="Soft time limit of any task, seconds.")
    redelivery_timeout: float = Field(
        0.0, ge=0, description="Seconds after which the broker hands a task its agent took but "
        "never acknowledged (the agent died mid-task) to the next agent of the queue; 0: "
        "task_time_limit + 60, longer than any task runs (shorter, a slow task could run twice "
        "at once)."
    )


class SchedulerSettings(BaseModel):
    """How the scheduler chooses nodes."""

    # The cloud's default ratios live in etcd (placement/default-ratios/cloud):
    # these only seed that record when the first scheduler starts.
    cpu_allocation_ratio: float = Field(
        16.0, description="vCPU overcommit factor the cloud's default ratios start from.")
    ram_allocation_ratio: float = Field(
        1.5, description="Memory overcommit factor the cloud's default ratios start from.")
    disk_allocation_ratio: float = Field(
        1.0, description="Disk overcommit factor the cloud's default ratios start from.")
    weigher: str = Field("spread", description="'spread' (most free first) or 'pack'.")
    ram_weight_multiplier: float = Field(1.0, description="Weight of free memory.")
    cpu_weight_multiplier: float = Field(1.0, description="Weight of free vCPUs.")
    disk_weight_multiplier: float = Field(1.0, description="Weight of free disk.")
    soft_affinity_weight_multiplier: float = Field(
        10.0, description="Weight of (soft-)affinity group preferences."
    )
    host_subset_size: int = Field(
        3, description="Pick randomly among this many best nodes, to spread racing replicas."
    )
    claim_attempts: int = Field(
        16, description="Nodes a decision keeps ranked by weight behind its random pick."
    )
    claim_timeout: float = Field(
        30.0, gt=0, description="Seconds one claim (or release) keeps running again after "
        "lost races before it answers UNAVAILABLE (capacity running out answers at once)."
    )
    max_candidates: int = Field(
        1000, description="Weigh at most this many nodes that passed the filters (a random "
        "sample), like Placement's max_placement_results."
    )


class NetworkSettings(BaseModel):
    """nubis-network: VXLAN segments, MTUs, MACs and how bound ports are realized on nodes."""

    vni_min: int = Field(
        1001, ge=1, le=16777215, description="Lowest VXLAN VNI (segmentation id) given to "
        "a network; the range is the service's own (VNIs below it stay free for operators)."
    )
    vni_max: int = Field(
        16000000, ge=1, le=16777215, description="Highest VXLAN VNI given to a network."
    )
    default_mtu: int = Field(
        1450, ge=68, le=9000, description="MTU of a network created without one: 1500 less "
        "the 50 bytes of VXLAN encapsulation."
    )
    mac_prefix: str = Field(
        "fa:16:3e", pattern=r"^[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$",
        description="First three octets of generated port MACs (Neutron's fa:16:3e); the "
        "other three are random, unique by an etcd key per MAC.",
    )
    ipam_candidates: int = Field(
        3, ge=1, le=32, description="Random free-looking addresses one port-create "
        "transaction reads before it scans the subnet's allocations (nearly full pool)."
    )
    realize_interval: float = Field(
        2.0, gt=0, description="Seconds between passes of the realizer loop, which re-sends "
        "the desired state of every (network, node) whose realization is pending."
    )
    realize_timeout: float = Field(
        30.0, gt=0, description="Seconds an agent gets to realize a network on its node."
    )


class AuthSettings(BaseModel):
    """Tokens, password hashing, login throttling and the bootstrap admin."""

    token_ttl: int = Field(3600, description="Seconds a token stays valid after it is issued.")
    hash_time_cost: int = Field(2, description="argon2id iterations per password hash.")
    hash_memory_kib: int = Field(19456, description="argon2id memory per password hash (KiB).")
    hash_parallelism: int = Field(1, description="argon2id lanes per password hash.")
    max_failures: int = Field(
        5, description="Failed logins of one user before further attempts are throttled."
    )
    throttle_seconds: float = Field(
        30.0, description="How long a throttled user is refused before trying again."
    )
    signing_key_file: str | None = Field(
        None, description="PEM Ed25519 private key; None keeps the signing key in etcd."
    )
    admin_project: str = Field("admin", description="Project the bootstrap admin belongs to.")
    admin_user: str = Field("admin", description="Name of the bootstrap cloud-admin user.")
    admin_password: str | None = Field(
        None, description="Bootstrap admin password; None generates a random one."
    )
    revocation_resync: float = Field(
        30.0, description="Seconds between full re-reads of keys and revocations (watch backstop)."
    )


class ServiceAuthSettings(BaseModel):
    """The credential nubis services call each other with: a user holding the `service` role.

    `nubis-manage bootstrap` creates that user (and its project) when a password
    is configured here; every service that calls another logs in with it.
    """

    user: str = Field("nubis-service", description="Name of the service user.")
    password: SecretStr | None = Field(
        None, description="The service user's password (never logged); None: read "
        "password_file, and without either no service credential is configured."
    )
    password_file: str | None = Field(
        None, description="File whose first line is the password (keep it mode 0600); "
        "read when password is None."
    )
    project: str = Field(
        "service", description="Project the service user's tokens are scoped to; bootstrap "
        "creates it. The service role itself is cloud-wide."
    )

    def secret(self) -> str | None:
        """The configured password, or None when there is no service credential."""
        if self.password is not None:
            return self.password.get_secret_value() or None
        if not self.password_file:
            return None
        try:
            first = Path(self.password_file).read_text().splitlines()
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"service_auth.password_file {self.password_file} cannot be read: "
                f"{exc.strerror}", reason="nubis.settings.unreadable_password_file",
                metadata={"path": self.password_file}) from None
        return (first[0].strip() or None) if first else None


def _default_limits() -> dict[str, int]:
    return {
        "instances": 10, "vcpus": 20, "ram_mb": 51200, "volumes": 10, "volume_gb": 1000,
        "snapshots": 10, "networks": 10, "subnets": 10, "ports": 50, "routers": 10,
        "floating_ips": 10, "security_groups": 10, "security_group_rules": 100,
    }


class QuotaSettings(BaseModel):
    """The seed of the cloud's default limits (the limits themselves live in etcd)."""

    defaults: dict[str, int] = Field(
        default_factory=_default_limits,
        description="Limit per resource for projects without an override, -1 unlimited: "
        "written to etcd by `nubis-manage bootstrap` when the cloud has no defaults yet; "
        "after that `nubis quota set-default` changes them and this setting is not read.",
    )


# Default gRPC port of each control service; its metrics listen at +100.
DEFAULT_PORTS = {"identity": 7500, "compute": 7501, "storage": 7502, "network": 7503,
                 "scheduler": 7504}


def _endpoint(port: int) -> ServiceEndpoint:
    return ServiceEndpoint(port=port, metrics_port=port + 100)


class Settings(BaseSettings):
    """Every knob of a nubis process. Each field says what it is for."""

    model_config = SettingsConfigDict(
        env_prefix="NUBIS_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    etcd: EtcdSettings = Field(default_factory=EtcdSettings, description="etcd connection.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Celery broker and result backend."
    )
    identity: ServiceEndpoint = Field(default_factory=lambda: _endpoint(DEFAULT_PORTS["identity"]))
    compute: ComputeSettings = Field(
        default_factory=lambda: ComputeSettings(port=DEFAULT_PORTS["compute"],
                                                metrics_port=DEFAULT_PORTS["compute"] + 100),
        description="The compute service's endpoint and its instance operations.",
    )
    storage: StorageSettings = Field(
        default_factory=lambda: StorageSettings(port=DEFAULT_PORTS["storage"],
                                                metrics_port=DEFAULT_PORTS["storage"] + 100),
        description="The storage service's endpoint and its image store.",
    )
    network: ServiceEndpoint = Field(default_factory=lambda: _endpoint(DEFAULT_PORTS["network"]))
    scheduler: ServiceEndpoint = Field(
        default_factory=lambda: _endpoint(DEFAULT_PORTS["scheduler"]))
    tls: TlsSettings = Field(default_factory=TlsSettings, description="gRPC transport security.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="Tokens and logins.")
    service_auth: ServiceAuthSettings = Field(
        default_factory=ServiceAuthSettings,
        description="Credential of service-to-service calls.",
    )
    quota: QuotaSettings = Field(default_factory=QuotaSettings, description="Quota defaults.")
    agent: AgentSettings = Field(default_factory=AgentSettings, description="Node agent.")
    scheduling: SchedulerSettings = Field(
        default_factory=SchedulerSettings, description="Scheduler filters and weighers."
    )
    networking: NetworkSettings = Field(
        default_factory=NetworkSettings,
        description="Network service: VNI range, default MTU, MAC prefix, realization.",
    )
    log_level: str = Field("info", description="structlog level: debug, info, warning, error.")
    log_json: bool = Field(True, description="Emit JSON log lines (False: human console).")
    shutdown_grace: float = Field(
        5.0, description="Seconds in-flight RPCs get to finish after SIGTERM."
    )
    catalog_ttl: int = Field(
        10, description="Seconds a service's catalog entry outlives the service (etcd lease)."
    )

    config_file: str | None = Field(
        None, description="TOML file read under the environment (also NUBIS_CONFIG)."
    )

    @field_validator(*DEFAULT_PORTS, mode="before")
    @classmethod
    def _keep_default_ports(cls, value: Any, info: ValidationInfo) -> Any:
        """An endpoint given in part (only host or advertise_host, say) keeps its default ports.

        Without this, `NUBIS_IDENTITY__HOST=0.0.0.0` alone would bind a random port.
        """
        if isinstance(value, dict) and info.field_name in DEFAULT_PORTS:
            port = DEFAULT_PORTS[info.field_name]
            return {"port": port, "metrics_port": port + 100, **value}
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("NUBIS_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(config_file: str | None = None, **overrides: Any) -> Settings:
    """Build the settings of this process: explicit overrides > env > TOML file."""
    if config_file is None:
        return Settings(**overrides)
    previous = os.environ.get("NUBIS_CONFIG")
    os.environ["NUBIS_CONFIG"] = config_file
    try:
        return Settings(config_file=config_file, **overrides)
    finally:
        if previous is None:
            del os.environ["NUBIS_CONFIG"]
        else:
            os.environ["NUBIS_CONFIG"] = previous
