"""Argument checks of the compute tasks: what a domain spec, disk or NIC must be before libvirt
sees it (every fault of a request reported at once, with its field)."""

from __future__ import annotations

import posixpath
import re
import uuid

from nubis.agent.v1 import tasks_pb2

from services.agent.driver import domain_xml
from services.common import errors, network_devices

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TARGET = re.compile(r"(vd|sd|hd)[a-z]{1,2}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Kept as an XML attribute of the metadata: any text but control characters.
_HOSTNAME = re.compile(r"[^\x00-\x1f\x7f]{0,255}")
DISK_FORMATS = ("qcow2", "raw")
BUSES = ("", "virtio", "scsi", "sata")
KERNEL_FORMATS = ("kernel", "ramdisk", "raw")
"""Formats a direct-boot kernel or ramdisk image may have (raw: a plain file)."""
MAX_WAIT = 300
"""Longest wait for a guest a power-off or reboot may ask (within the tasks' time limits)."""
MAX_CONSOLE_BYTES = 16 << 20
"""Most console bytes one console_log may ask for."""
_MAX_VCPUS = 1024
_MAX_MEMORY_MB = 16 << 20


def name_only(name: str, message: str) -> None:
    problems = errors.ViolationCollector()
    _check_name(problems, "name", name)
    problems.check(message)


def name_and_wait(name: str, timeout_seconds: int, message: str) -> None:
    problems = errors.ViolationCollector()
    _check_name(problems, "name", name)
    if not 0 <= timeout_seconds <= MAX_WAIT:
        problems.add("timeout_seconds", f"must be 0..{MAX_WAIT}")
    problems.check(message)


def console_request(request: tasks_pb2.ConsoleLogRequest) -> None:
    problems = errors.ViolationCollector()
    _check_name(problems, "name", request.name)
    if request.tail_lines < 0:
        problems.add("tail_lines", "must not be negative")
    if not 0 <= request.max_bytes <= MAX_CONSOLE_BYTES:
        problems.add("max_bytes", f"must be 0..{MAX_CONSOLE_BYTES}")
    problems.check("cannot read the console log")


def domain_spec(spec: tasks_pb2.DomainSpec, field: str) -> None:
    """Every fault of a spec to render, then InvalidArgument naming them."""
    problems = errors.ViolationCollector()
    _check_name(problems, f"{field}.name", spec.name)
    if not _is_uuid(spec.uuid):
        problems.add(f"{field}.uuid", "must be a UUID")
    if not 0 < spec.vcpus <= _MAX_VCPUS:
        problems.add(f"{field}.vcpus", f"must be 1..{_MAX_VCPUS}")
    if not 0 < spec.memory_mb <= _MAX_MEMORY_MB:
        problems.add(f"{field}.memory_mb", f"must be 1..{_MAX_MEMORY_MB}")
    if not _HOSTNAME.fullmatch(spec.hostname):
        problems.add(f"{field}.hostname", "at most 255 characters, no control characters")
    _check_devices(problems, field, spec)
    if spec.HasField("kernel_boot"):
        _check_kernel(problems, f"{field}.kernel_boot", spec.kernel_boot)
    elif not spec.disks:
        problems.add(f"{field}.disks", "a domain without a kernel boots from a disk")
    problems.check(f"cannot render domain {spec.name!r}")


def _check_devices(problems: errors.ViolationCollector, field: str,
                   spec: tasks_pb2.DomainSpec) -> None:
    targets = [disk.target_dev for disk in spec.disks]
    for index, disk in enumerate(spec.disks):
        check_disk(problems, f"{field}.disks[{index}]", disk)
        if targets.count(disk.target_dev) > 1:
            problems.add(f"{field}.disks[{index}].target_dev", "two disks have this device")
    macs = [interface.mac.lower() for interface in spec.interfaces]
    for index, interface in enumerate(spec.interfaces):
        check_interface(problems, f"{field}.interfaces[{index}]", interface)
        if macs.count(interface.mac.lower()) > 1:
            problems.add(f"{field}.interfaces[{index}].mac", "two NICs have this MAC")


def device_request(request: tasks_pb2.DeviceRequest, *, attach: bool) -> None:
    """A hot-plug request: the whole device to attach; on detach only what names it."""
    problems = errors.ViolationCollector()
    _check_name(problems, "name", request.name)
    which = request.WhichOneof("device")
    if which is None:
        problems.add("device", "name a disk or an interface")
    elif which == "disk":
        if attach:
            check_disk(problems, "disk", request.disk)
        elif not _TARGET.fullmatch(request.disk.target_dev):
            problems.add("disk.target_dev", "must be a device like vdb")
    elif attach:
        check_interface(problems, "interface", request.interface)
    elif not _MAC.fullmatch(request.interface.mac):
        problems.add("interface.mac", "must be a MAC address like 52:54:00:12:34:56")
    problems.check("cannot attach the device" if attach else "cannot detach the device")


def migrate_request(request: tasks_pb2.MigrateRequest) -> None:
    problems = errors.ViolationCollector()
    _check_name(problems, "name", request.name)
    if not request.destination_uri or "://" not in request.destination_uri:
        problems.add("destination_uri", "must be a libvirt URI")
    if request.HasField("destination"):
        try:
            domain_spec(request.destination, "destination")
        except errors.InvalidArgument as exc:
            problems.violations.extend(exc.violations)
        if request.destination.name != request.name:
            problems.add("destination.name", "must be the domain's name")
    problems.check("cannot migrate the domain")


def check_disk(problems: errors.ViolationCollector, field: str,
               disk: tasks_pb2.DomainDisk) -> None:
    if not posixpath.isabs(disk.path) or posixpath.normpath(disk.path) != disk.path:
        problems.add(f"{field}.path", "must be a normalized absolute path")
    if disk.format not in DISK_FORMATS:
        problems.add(f"{field}.format", "must be qcow2 or raw")
    if not _TARGET.fullmatch(disk.target_dev):
        problems.add(f"{field}.target_dev", "must be a device like vda")
    if disk.bus not in BUSES:
        problems.add(f"{field}.bus", f"must be one of {', '.join(b for b in BUSES if b)}")


def check_interface(problems: errors.ViolationCollector, field: str,
                    interface: tasks_pb2.DomainInterface) -> None:
    if not _MAC.fullmatch(interface.mac):
        problems.add(f"{field}.mac", "must be a MAC address like 52:54:00:12:34:56")
    for name, value in (("port_id", interface.port_id), ("network_id", interface.network_id)):
        try:
            network_devices.short_id(value)
        except ValueError:
            problems.add(f"{field}.{name}", "must be a UUID")
    if interface.mtu and not 68 <= interface.mtu <= 9000:
        problems.add(f"{field}.mtu", "must be 68..9000 (0 = libvirt's default)")
    if interface.filterref_xml:
        try:
            domain_xml.filterref(interface.filterref_xml)
        except ValueError as exc:
            problems.add(f"{field}.filterref_xml", str(exc))


def _check_kernel(problems: errors.ViolationCollector, field: str,
                  boot: tasks_pb2.KernelBoot) -> None:
    if not boot.HasField("kernel"):
        problems.add(f"{field}.kernel", "a kernel boot needs its kernel image")
    else:
        _check_image(problems, f"{field}.kernel", boot.kernel)
    if boot.HasField("ramdisk"):
        _check_image(problems, f"{field}.ramdisk", boot.ramdisk)
    if len(boot.cmdline) > 4096 or "\0" in boot.cmdline:
        problems.add(f"{field}.cmdline", "at most 4096 characters, no NUL")


def _check_image(problems: errors.ViolationCollector, field: str,
                 image: tasks_pb2.CachedImageSource) -> None:
    if not _is_uuid(image.image_id):
        problems.add(f"{field}.image_id", "must be a UUID")
    if image.size_bytes <= 0:
        problems.add(f"{field}.size_bytes", "must be positive")
    if not _SHA256.fullmatch(image.sha256):
        problems.add(f"{field}.sha256", "must be 64 lower-case hex digits")
    if image.disk_format not in KERNEL_FORMATS:
        problems.add(f"{field}.disk_format", f"must be one of {', '.join(KERNEL_FORMATS)}")


def _check_name(problems: errors.ViolationCollector, field: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        problems.add(field, "1-128 letters, digits, '.', '_' or '-', not first")


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
