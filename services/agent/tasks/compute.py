"""Compute tasks: the node's domains, made, powered, hot-plugged, read, moved and removed.

Every task reads libvirt first (check prerequisites) and finds a repeat done:
a spawn of a domain running with the asked UUID answers it, a destroy of a
domain gone answers `changed: false`, a power-off of a domain shut off
answers its state. So a task the broker delivers again (its agent died
mid-task) converges on one domain. Tasks on one domain run one after the
other (the phase lock is the domain's name). A domain of the asked name with
another UUID, or the asked UUID under another name, is never touched
(`nubis.agent.domain_conflict`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import structlog
from nubis.agent.v1 import tasks_pb2

from services.agent import dataplane
from services.agent import driver as driver_module
from services.agent.driver import domain_xml
from services.agent.driver import domains as domain_driver
from services.agent.tasks import compute_checks, phases
from services.agent.tasks import storage as storage_tasks
from services.common import errors, tasks
from services.common.settings import Settings

log = structlog.get_logger(__name__)

CONFLICT = "nubis.agent.domain_conflict"
MISSING = "nubis.agent.libvirt_not_found"
"""A missing domain: the reason domain_status has answered from the start (permanent)."""
NOT_RUNNING = "nubis.agent.domain_not_running"
REJECTED = "nubis.agent.domain_rejected"
START_FAILED = "nubis.agent.domain_start_failed"
CONSOLE_DIR = "nubis.agent.console_dir"
UNPLUG_WAIT = 30.0
"""Seconds a live unplug waits for the device to leave the running domain."""
UNPLUG_POLL = 0.2
MIGRATION_UNSUPPORTED = domain_driver.MIGRATION_UNSUPPORTED
DEFAULT_REBOOT_WAIT = 60
"""Seconds a soft reboot waits for the guest when the request names no timeout."""
DEFAULT_CONSOLE_BYTES = 1 << 20
"""Console bytes a console_log answers at most when the request names no limit."""
_STOPPED = frozenset({"shutoff", "crashed"})


class NodeDomains:
    """What the compute tasks share: the driver's domains, the console logs' directory, the
    virt type to use and the image cache kernels are fetched into."""

    def __init__(self, driver: driver_module.Driver, settings: Settings, node: str,
                 storage: storage_tasks.NodeStorage) -> None:
        self.domains = driver.domains
        agent = settings.agent
        self.console_dir = Path(agent.console_log_dir
                                or os.path.join(dataplane.state_dir(agent, node), "console"))
        """Where the node's guests log their consoles (a migration's destination uses the
        same path: the directory is the same on every node)."""
        self.virt_type = agent.virt_type
        self.tcg_vcpu_scheduler = agent.tcg_vcpu_scheduler
        self._storage = storage
        self._hypervisor: domain_driver.Hypervisor | None = None

    def make_console_dir(self) -> None:
        """The console log directory exists (FailedPrecondition if the agent cannot make it)."""
        try:
            self.console_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot make the console log directory {self.console_dir}: {exc}",
                reason=CONSOLE_DIR, metadata={"path": str(self.console_dir)}) from exc

    def console_log(self, name: str) -> Path:
        return self.console_dir / f"{name}.log"

    def existing(self, name: str) -> domain_driver.DomainState:
        """The domain, or NotFound saying the node has none of that name."""
        found = self.domains.find(name)
        if found is None:
            raise errors.NotFound(f"the node has no domain {name}", reason=MISSING,
                                  metadata={"domain": name})
        return found

    def status(self, name: str) -> tasks_pb2.DomainStatus:
        """The domain's state with the disks and NICs of its definition."""
        answer = message(self.existing(name))
        disks, macs = domain_xml.device_names(self.domains.xml(name, inactive=True))
        answer.disk_targets.extend(disks)
        answer.interface_macs.extend(macs)
        return answer

    def hypervisor(self) -> domain_driver.Hypervisor:
        """What libvirt offers (read once: it does not change under the agent)."""
        if self._hypervisor is None:
            self._hypervisor = self.domains.hypervisor(self.virt_type)
        return self._hypervisor

    def warm(self) -> None:
        """Read the hypervisor offer now, before the worker takes tasks: a fresh libvirtd
        probes QEMU the first time it is asked (seconds), which would fall on the first
        spawn. A libvirt that cannot answer yet is asked again at that spawn."""
        try:
            self.hypervisor()
        except errors.NubisError as exc:
            log.warning("cannot read the hypervisor offer yet", error=exc.message)

    def placement(self, spec: tasks_pb2.DomainSpec, deadline: float) -> domain_xml.Placement:
        """How the domain is put on this node: its type, the console log file, and the
        cached kernel and ramdisk (fetched into the node's image cache first)."""
        hypervisor = self.hypervisor()
        kernel = ramdisk = ""
        if spec.HasField("kernel_boot"):
            kernel = self._cached(spec.kernel_boot.kernel, deadline)
            if spec.kernel_boot.HasField("ramdisk"):
                ramdisk = self._cached(spec.kernel_boot.ramdisk, deadline)
        return domain_xml.Placement(domain_type=hypervisor.domain_type, arch=hypervisor.arch,
                                    console_log=str(self.console_log(spec.name)),
                                    kernel_path=kernel, ramdisk_path=ramdisk,
                                    tcg_vcpu_scheduler=self.tcg_vcpu_scheduler)

    def _cached(self, image: tasks_pb2.CachedImageSource, deadline: float) -> str:
        pool = self._storage.pool("")
        volume, _ = self._storage.ensure_image(pool, image, deadline)
        if self.domains.is_test:
            # The test driver's pool keeps no files: the bytes stay in the cache directory.
            return str(self._storage.images.file(image.image_id))
        return volume.path


def message(domain: domain_driver.DomainState) -> tasks_pb2.DomainStatus:
    return tasks_pb2.DomainStatus(name=domain.name, uuid=domain.uuid, state=domain.state,
                                  instance_id=domain.instance_id)


def _lock(name: str) -> str:
    return f"domain/{name}"


class _DomainTask(phases.AgentTask[tasks.Req, tasks.Resp]):
    def __init__(self, node: NodeDomains) -> None:
        self._node = node
        self._domains = node.domains


class DomainStatus(_DomainTask[tasks_pb2.DomainStatusRequest, tasks_pb2.DomainStatus]):
    """One domain's power state, for the compute service's power-state sync."""

    spec = tasks.DOMAIN_STATUS

    def check_arguments(self, request: tasks_pb2.DomainStatusRequest) -> None:
        compute_checks.name_only(request.name, "cannot read the domain")

    def execute(self, request: tasks_pb2.DomainStatusRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        return self._node.status(request.name)


class ListDomains(_DomainTask[tasks_pb2.ListDomainsRequest, tasks_pb2.ListDomainsResponse]):
    """Every domain of the node with its state and instance, sorted by name."""

    spec = tasks.LIST_DOMAINS

    def execute(self, request: tasks_pb2.ListDomainsRequest,
                ctx: phases.Context) -> tasks_pb2.ListDomainsResponse:
        return tasks_pb2.ListDomainsResponse(
            domains=[message(domain) for domain in self._domains.all()])


class Spawn(_DomainTask[tasks_pb2.SpawnRequest, tasks_pb2.DomainStatus]):
    """The domain is defined (persistent) from its spec and runs."""

    spec = tasks.SPAWN

    def check_arguments(self, request: tasks_pb2.SpawnRequest) -> None:
        compute_checks.domain_spec(request.domain, "domain")

    def lock_key(self, request: tasks_pb2.SpawnRequest) -> str:
        return _lock(request.domain.name)

    def check_prerequisites(self, request: tasks_pb2.SpawnRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        spec = request.domain
        found = self._domains.find(spec.name)
        same_uuid = self._domains.find_uuid(spec.uuid)
        for other in (found, same_uuid):
            if other is not None and (other.name, other.uuid.lower()) != (
                    spec.name, spec.uuid.lower()):
                raise errors.FailedPrecondition(
                    f"the node has domain {other.name} with UUID {other.uuid}; cannot make "
                    f"{spec.name} with UUID {spec.uuid}", reason=CONFLICT,
                    metadata={"domain": spec.name, "uuid": spec.uuid,
                              "existing_domain": other.name, "existing_uuid": other.uuid})
        if found is not None and found.active:
            return self._node.status(spec.name)
        return None

    def execute(self, request: tasks_pb2.SpawnRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        spec = request.domain
        began = time.perf_counter()
        placement = self._node.placement(spec, ctx.deadline)
        self._node.make_console_dir()
        placed = time.perf_counter()
        # A domain defined but shut off (a spawn that stopped between define and start)
        # is defined again from this spec, then started.
        definition = domain_xml.render(spec, placement)
        try:
            self._domains.define(definition)
        except errors.FailedPrecondition as exc:
            raise _refused(spec, REJECTED, f"libvirt rejected domain {spec.name}", exc) from exc
        defined = time.perf_counter()
        try:
            self._domains.start(spec.name)
        except errors.FailedPrecondition as exc:
            # A domain that cannot start (a disk file missing, ...) is not left behind.
            self._domains.undefine(spec.name)
            raise _refused(spec, START_FAILED, f"domain {spec.name} did not start", exc) from exc
        log.info("domain started", domain=spec.name, placement_ms=_ms(placed - began),
                 define_ms=_ms(defined - placed), start_ms=_ms(time.perf_counter() - defined))
        # libvirt's start returns once the guest runs, as defined from `definition`: that is
        # the answer. Reading it back from a libvirtd busy starting other guests waited up to
        # 0.2 s on the domain; a repeated spawn reads it (check_prerequisites).
        disks, macs = domain_xml.device_names(definition)
        return tasks_pb2.DomainStatus(name=spec.name, uuid=spec.uuid.lower(), state="running",
                                      instance_id=spec.uuid, disk_targets=disks,
                                      interface_macs=macs)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _refused(spec: tasks_pb2.DomainSpec, reason: str, what: str,
             cause: errors.NubisError) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(f"{what}: {cause.message}", reason=reason,
                                     metadata={**cause.metadata, "domain": spec.name})


class PowerOn(_DomainTask[tasks_pb2.DomainRequest, tasks_pb2.DomainStatus]):
    """The domain runs: started if it was shut off."""

    spec = tasks.POWER_ON

    def check_arguments(self, request: tasks_pb2.DomainRequest) -> None:
        compute_checks.name_only(request.name, "cannot start the domain")

    def lock_key(self, request: tasks_pb2.DomainRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.DomainRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        found = self._node.existing(request.name)
        return self._node.status(request.name) if found.active else None

    def execute(self, request: tasks_pb2.DomainRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        self._domains.start(request.name)
        return self._node.status(request.name)


class PowerOff(_DomainTask[tasks_pb2.PowerOffRequest, tasks_pb2.DomainStatus]):
    """The domain is shut off: an ACPI shutdown, then a power cut after the timeout."""

    spec = tasks.POWER_OFF

    def check_arguments(self, request: tasks_pb2.PowerOffRequest) -> None:
        compute_checks.name_and_wait(request.name, request.timeout_seconds,
                                     "cannot stop the domain")

    def lock_key(self, request: tasks_pb2.PowerOffRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.PowerOffRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        found = self._node.existing(request.name)
        return None if found.active else self._node.status(request.name)

    def execute(self, request: tasks_pb2.PowerOffRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        _stop(self._domains, request.name, request.timeout_seconds)
        return self._node.status(request.name)


def _stop(domains: domain_driver.Domains, name: str, wait: float) -> bool:
    """Shut the domain off: ask the guest, wait up to `wait` s, then cut the power. True if
    the guest shut down by itself."""
    if wait > 0:
        domains.shutdown(name)
        if domains.wait_for(name, _STOPPED, wait) is not None:
            return True
    domains.destroy(name)
    return False


class Reboot(_DomainTask[tasks_pb2.RebootRequest, tasks_pb2.DomainStatus]):
    """The domain restarts: soft asks the guest (hard after the timeout), hard power-cycles.

    A soft reboot is Nova's: an ACPI shutdown, a wait until the domain is off,
    then a start. libvirt's own virDomainReboot returns before the guest acts
    and says nothing when the guest ignores it, so the fallback to a hard
    reboot after `timeout_seconds` could never be taken with it. A domain
    found shut off is started: a reboot that stopped between its stop and its
    start finishes so.
    """

    spec = tasks.REBOOT

    def check_arguments(self, request: tasks_pb2.RebootRequest) -> None:
        compute_checks.name_and_wait(request.name, request.timeout_seconds,
                                     "cannot reboot the domain")

    def lock_key(self, request: tasks_pb2.RebootRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.RebootRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        self._node.existing(request.name)
        return None

    def execute(self, request: tasks_pb2.RebootRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        name = request.name
        if self._node.existing(name).active:
            wait = 0 if request.hard else request.timeout_seconds or DEFAULT_REBOOT_WAIT
            _stop(self._domains, name, wait)
        self._domains.start(name)
        return self._node.status(name)


class Destroy(_DomainTask[tasks_pb2.DestroyRequest, tasks_pb2.DestroyResponse]):
    """The domain is gone: stopped, undefined, its console log removed (its disks are
    storage's)."""

    spec = tasks.DESTROY

    def check_arguments(self, request: tasks_pb2.DestroyRequest) -> None:
        compute_checks.name_only(request.name, "cannot destroy the domain")

    def lock_key(self, request: tasks_pb2.DestroyRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.DestroyRequest,
                            ctx: phases.Context) -> tasks_pb2.DestroyResponse | None:
        if self._domains.find(request.name) is None:
            self._node.console_log(request.name).unlink(missing_ok=True)
            return tasks_pb2.DestroyResponse(changed=False)
        return None

    def execute(self, request: tasks_pb2.DestroyRequest,
                ctx: phases.Context) -> tasks_pb2.DestroyResponse:
        self._domains.destroy(request.name)
        if self._domains.find(request.name) is not None:  # a transient domain ends at destroy
            self._domains.undefine(request.name)
        self._node.console_log(request.name).unlink(missing_ok=True)
        return tasks_pb2.DestroyResponse(changed=True)


class _Plug(_DomainTask[tasks_pb2.DeviceRequest, tasks_pb2.DomainStatus]):
    """A disk (by target device) or NIC (by MAC) plugged in or out, live while the domain
    runs and in its persistent definition; a device already where it should be is done."""

    attach = True

    def check_arguments(self, request: tasks_pb2.DeviceRequest) -> None:
        compute_checks.device_request(request, attach=self.attach)

    def lock_key(self, request: tasks_pb2.DeviceRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.DeviceRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        found = self._node.existing(request.name)
        live, config = self._present(request, found.active)
        done = (config and (live or not found.active)) if self.attach else not (live or config)
        return self._node.status(request.name) if done else None

    def execute(self, request: tasks_pb2.DeviceRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        found = self._node.existing(request.name)
        live, config = self._present(request, found.active)
        if self.attach:
            device = _device_xml(request)
            self._domains.attach(request.name, device, live=found.active and not live,
                                 config=not config)
        else:
            device = self._found(request, inactive=not live) or _device_xml(request)
            self._domains.detach(request.name, device, live=live, config=config)
            if live and not self._domains.is_test:  # the test driver has no live unplug
                self._wait_unplugged(request, ctx.deadline)
        return self._node.status(request.name)

    def _wait_unplugged(self, request: tasks_pb2.DeviceRequest, deadline: float) -> None:
        """Until the device has left the running domain: QEMU unplugs it once the guest
        lets go (an ACPI eject), which libvirt may not wait for (a slow guest under TCG).
        At most UNPLUG_WAIT seconds (within the task's deadline); then it is left as it is."""
        give_up = min(time.time() + UNPLUG_WAIT, deadline)
        while self._found(request, inactive=False) is not None and time.time() < give_up:
            time.sleep(UNPLUG_POLL)

    def _present(self, request: tasks_pb2.DeviceRequest, active: bool) -> tuple[bool, bool]:
        """Whether the device is in the live domain (False when it is not running) and in
        its persistent definition."""
        live = active and self._found(request, inactive=False) is not None
        return live, self._found(request, inactive=True) is not None

    def _found(self, request: tasks_pb2.DeviceRequest, *, inactive: bool) -> str | None:
        xml = self._domains.xml(request.name, inactive=inactive)
        if request.WhichOneof("device") == "disk":
            return domain_xml.find_disk(xml, request.disk.target_dev)
        return domain_xml.find_interface(xml, request.interface.mac)


def _device_xml(request: tasks_pb2.DeviceRequest) -> str:
    if request.WhichOneof("device") == "disk":
        return domain_xml.disk_xml(request.disk)
    return domain_xml.interface_xml(request.interface)


class AttachDevice(_Plug):
    """A disk or NIC is plugged into the domain."""

    spec = tasks.ATTACH_DEVICE
    attach = True


class DetachDevice(_Plug):
    """A disk or NIC is out of the domain."""

    spec = tasks.DETACH_DEVICE
    attach = False


class ConsoleLog(_DomainTask[tasks_pb2.ConsoleLogRequest, tasks_pb2.ConsoleLogResponse]):
    """The tail of the domain's serial console log (empty while the guest printed nothing,
    and on the test driver, whose guests never print)."""

    spec = tasks.CONSOLE_LOG

    def check_arguments(self, request: tasks_pb2.ConsoleLogRequest) -> None:
        compute_checks.console_request(request)

    def execute(self, request: tasks_pb2.ConsoleLogRequest,
                ctx: phases.Context) -> tasks_pb2.ConsoleLogResponse:
        self._node.existing(request.name)
        path = domain_xml.console_log_path(self._domains.xml(request.name)) or str(
            self._node.console_log(request.name))
        text, truncated = read_tail(Path(path), request.max_bytes or DEFAULT_CONSOLE_BYTES,
                                    request.tail_lines)
        return tasks_pb2.ConsoleLogResponse(output=text, truncated=truncated)


def read_tail(path: Path, max_bytes: int, tail_lines: int) -> tuple[str, bool]:
    """The last `max_bytes` of the file (from a whole line), then its last `tail_lines` lines
    (0 = all); True if bytes were cut. A missing file is empty."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            start = max(size - max_bytes, 0)
            file.seek(start)
            data = file.read(max_bytes)
    except FileNotFoundError:
        return "", False
    truncated = start > 0
    if truncated and b"\n" in data:
        data = data[data.index(b"\n") + 1:]  # a line cut at the start is dropped
    if tail_lines:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:])
    return data.decode("utf-8", errors="replace"), truncated


class Migrate(_DomainTask[tasks_pb2.MigrateRequest, tasks_pb2.DomainStatus]):
    """The running domain moves live to another node's libvirt (peer to peer), defined there
    and undefined here; the answer is the domain as the destination has it."""

    spec = tasks.MIGRATE

    def check_arguments(self, request: tasks_pb2.MigrateRequest) -> None:
        compute_checks.migrate_request(request)

    def lock_key(self, request: tasks_pb2.MigrateRequest) -> str:
        return _lock(request.name)

    def check_prerequisites(self, request: tasks_pb2.MigrateRequest,
                            ctx: phases.Context) -> tasks_pb2.DomainStatus | None:
        if self._domains.is_test:
            raise errors.FailedPrecondition(
                "libvirt's test driver keeps its domains in the agent's memory, with no "
                "migration between agents; live migration needs nodes on qemu",
                reason=MIGRATION_UNSUPPORTED, metadata={"domain": request.name})
        found = self._domains.find(request.name)
        if found is None:
            moved = domain_driver.remote_status(request.destination_uri, request.name)
            if moved is not None and moved.running:
                return message(moved)  # a repeat of a migration that finished
            raise errors.NotFound(f"the node has no domain {request.name}", reason=MISSING,
                                  metadata={"domain": request.name})
        if not found.running:
            raise errors.FailedPrecondition(
                f"domain {request.name} is {found.state}; live migration needs it running",
                reason=NOT_RUNNING, metadata={"domain": request.name, "state": found.state})
        return None

    def execute(self, request: tasks_pb2.MigrateRequest,
                ctx: phases.Context) -> tasks_pb2.DomainStatus:
        if request.HasField("destination"):
            placement = self._node.placement(request.destination, ctx.deadline)
            xml = domain_xml.render(request.destination, placement)
        else:
            xml = self._domains.xml(request.name, inactive=True)
        self._domains.migrate(request.name, request.destination_uri, xml,
                              block=request.block_migration)
        moved = domain_driver.remote_status(request.destination_uri, request.name)
        if moved is None:
            raise errors.Unavailable(
                f"domain {request.name} is not at {request.destination_uri} after its migration",
                reason="nubis.agent.libvirt_unavailable", metadata={"domain": request.name})
        return message(moved)


def all_tasks(driver: driver_module.Driver, settings: Settings, node: str,
              storage: storage_tasks.NodeStorage) -> list[phases.AgentTask[Any, Any]]:
    shared = NodeDomains(driver, settings, node, storage)
    shared.warm()
    return [DomainStatus(shared), ListDomains(shared), Spawn(shared), PowerOn(shared),
            PowerOff(shared), Reboot(shared), Destroy(shared), AttachDevice(shared),
            DetachDevice(shared), ConsoleLog(shared), Migrate(shared)]
