"""libvirt domain XML of a nubis instance, rendered from its DomainSpec, and its metadata read back.

Pure functions: no libvirt here. What depends on the node (the domain type
libvirt offers, the guest architecture, where the console log and cached
kernel images are) comes in as a `Placement`. Every domain nubis makes
carries ``<nubis:instance id=... project=... hostname=.../>`` in its
``<metadata>``, so the agent can tell its own domains (and their instances)
from anyone else's by reading libvirt alone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

from nubis.agent.v1 import tasks_pb2

from services.common import network_devices

NAMESPACE = "https://nubis.dev/xmlns/instance/1"
"""XML namespace of the nubis metadata element (permanent: domains carry it)."""
PREFIX = "nubis"
"""Prefix the metadata element is written with."""
METADATA_TAG = f"{{{NAMESPACE}}}instance"

# The serial console: libvirt logs what the guest prints to it into a file.
_SERIAL_PORT = "0"


@dataclass(frozen=True)
class Placement:
    """What the node decides about a domain beyond its spec."""

    domain_type: str
    """libvirt domain type: "kvm", "qemu" (TCG) or "test"."""
    arch: str
    """Guest architecture libvirt offers hvm guests for ("x86_64", "i686")."""
    console_log: str
    """File the serial console is logged to."""
    kernel_path: str = ""
    """The cached kernel image's file, for direct kernel boot ("" = boot from disk)."""
    ramdisk_path: str = ""
    """The cached ramdisk's file ("" = none)."""
    tcg_vcpu_scheduler: str = ""
    """Scheduling class of a TCG guest's vCPU threads ("batch", "idle"; "" = the default)."""


@dataclass(frozen=True)
class InstanceMetadata:
    """The nubis metadata of a domain."""

    instance_id: str
    project_id: str
    hostname: str


def render(spec: tasks_pb2.DomainSpec, placement: Placement) -> str:
    """The whole `<domain>` for `spec` on this node."""
    domain = ElementTree.Element("domain", type=placement.domain_type)
    ElementTree.SubElement(domain, "name").text = spec.name
    ElementTree.SubElement(domain, "uuid").text = spec.uuid
    metadata = ElementTree.SubElement(domain, "metadata")
    metadata.append(_metadata(spec))
    ElementTree.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mb)
    ElementTree.SubElement(domain, "vcpu").text = str(spec.vcpus)
    if placement.domain_type == "qemu" and placement.tcg_vcpu_scheduler:
        cputune = ElementTree.SubElement(domain, "cputune")
        ElementTree.SubElement(cputune, "vcpusched", vcpus=f"0-{spec.vcpus - 1}",
                               scheduler=placement.tcg_vcpu_scheduler)
    domain.append(_os(spec, placement))
    features = ElementTree.SubElement(domain, "features")
    ElementTree.SubElement(features, "acpi")  # the guest hears an ACPI shutdown
    ElementTree.SubElement(features, "apic")
    if placement.domain_type == "kvm":
        ElementTree.SubElement(domain, "cpu", mode="host-model")
    # Under TCG (and the test driver) no <cpu>: QEMU's default model is one TCG emulates.
    ElementTree.SubElement(domain, "on_poweroff").text = "destroy"
    ElementTree.SubElement(domain, "on_reboot").text = "restart"
    ElementTree.SubElement(domain, "on_crash").text = "destroy"
    devices = ElementTree.SubElement(domain, "devices")
    for disk in spec.disks:
        devices.append(disk_element(disk))
    for interface in spec.interfaces:
        devices.append(interface_element(interface))
    serial = ElementTree.SubElement(devices, "serial", type="pty")
    ElementTree.SubElement(serial, "log", file=placement.console_log, append="on")
    ElementTree.SubElement(serial, "target", port=_SERIAL_PORT)
    console = ElementTree.SubElement(devices, "console", type="pty")
    ElementTree.SubElement(console, "target", type="serial", port=_SERIAL_PORT)
    return _text(domain)


def _metadata(spec: tasks_pb2.DomainSpec) -> ElementTree.Element:
    ElementTree.register_namespace(PREFIX, NAMESPACE)
    return ElementTree.Element(METADATA_TAG, id=spec.uuid, project=spec.project_id,
                               hostname=spec.hostname)


def metadata_xml(spec: tasks_pb2.DomainSpec) -> str:
    """The bare `<nubis:instance .../>` element (libvirt's setMetadata takes it so)."""
    return _text(_metadata(spec))


def _os(spec: tasks_pb2.DomainSpec, placement: Placement) -> ElementTree.Element:
    os_element = ElementTree.Element("os")
    ElementTree.SubElement(os_element, "type", arch=placement.arch).text = "hvm"
    if placement.kernel_path:
        ElementTree.SubElement(os_element, "kernel").text = placement.kernel_path
        if placement.ramdisk_path:
            ElementTree.SubElement(os_element, "initrd").text = placement.ramdisk_path
        if spec.kernel_boot.cmdline:
            ElementTree.SubElement(os_element, "cmdline").text = spec.kernel_boot.cmdline
    else:
        ElementTree.SubElement(os_element, "boot", dev="hd")
    return os_element


def disk_element(disk: tasks_pb2.DomainDisk) -> ElementTree.Element:
    """One `<disk type='file'>`: the volume's file, its format, its device in the guest."""
    element = ElementTree.Element("disk", type="file", device="disk")
    ElementTree.SubElement(element, "driver", name="qemu", type=disk.format or "qcow2")
    ElementTree.SubElement(element, "source", file=disk.path)
    ElementTree.SubElement(element, "target", dev=disk.target_dev, bus=disk.bus or "virtio")
    if disk.volume_id:
        # virtio-blk shows the serial in /dev/disk/by-id, as Nova does with the volume id.
        ElementTree.SubElement(element, "serial").text = disk.volume_id[:20]
    return element


def interface_element(interface: tasks_pb2.DomainInterface) -> ElementTree.Element:
    """One `<interface type='bridge'>`: a tap of the port on its network's bridge."""
    element = ElementTree.Element("interface", type="bridge")
    ElementTree.SubElement(element, "mac", address=interface.mac.lower())
    ElementTree.SubElement(element, "source",
                           bridge=network_devices.bridge(interface.network_id))
    ElementTree.SubElement(element, "target", dev=network_devices.tap(interface.port_id))
    ElementTree.SubElement(element, "model", type="virtio")
    if interface.mtu:
        ElementTree.SubElement(element, "mtu", size=str(interface.mtu))
    if interface.filterref_xml:
        element.append(filterref(interface.filterref_xml))
    return element


def filterref(fragment: str) -> ElementTree.Element:
    """The port's `<filterref>` element; ValueError if the fragment is not one."""
    try:
        element = ElementTree.fromstring(fragment)
    except ElementTree.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc
    if element.tag != "filterref" or not element.get("filter"):
        raise ValueError("must be one <filterref filter='...'> element")
    return element


def disk_xml(disk: tasks_pb2.DomainDisk) -> str:
    return _text(disk_element(disk))


def interface_xml(interface: tasks_pb2.DomainInterface) -> str:
    return _text(interface_element(interface))


def parse_metadata(xml: str) -> InstanceMetadata | None:
    """The nubis metadata of a whole domain XML, or of the bare element; None without it."""
    root = ElementTree.fromstring(xml)
    found = root if root.tag in (METADATA_TAG, "instance") else root.find(
        f"metadata/{METADATA_TAG}")
    if found is None or not found.get("id"):
        return None
    return InstanceMetadata(instance_id=found.get("id", ""),
                            project_id=found.get("project", ""),
                            hostname=found.get("hostname", ""))


def find_disk(domain: str, target_dev: str) -> str | None:
    """The `<disk>` of the domain XML whose target is `target_dev`, as XML, or None."""
    for element in ElementTree.fromstring(domain).iterfind("devices/disk"):
        target = element.find("target")
        if target is not None and target.get("dev") == target_dev:
            return _text(element)
    return None


def find_interface(domain: str, mac: str) -> str | None:
    """The `<interface>` of the domain XML with MAC `mac` (any case), as XML, or None."""
    for element in ElementTree.fromstring(domain).iterfind("devices/interface"):
        address = element.find("mac")
        if address is not None and address.get("address", "").lower() == mac.lower():
            return _text(element)
    return None


def device_names(domain: str) -> tuple[list[str], list[str]]:
    """The domain XML's disk target devices and NIC MACs (lower case), in document order."""
    root = ElementTree.fromstring(domain)
    disks = [key for kind, key in map(_device_key, root.iterfind("devices/disk")) if key]
    macs = [key for kind, key in map(_device_key, root.iterfind("devices/interface")) if key]
    return disks, macs


def console_log_path(domain: str) -> str:
    """The file the domain's serial console is logged to ("" = none)."""
    log = ElementTree.fromstring(domain).find("devices/serial/log")
    return "" if log is None else log.get("file", "")


def with_device(domain: str, device: str) -> str:
    """The domain XML with `device` added to its devices."""
    root = ElementTree.fromstring(domain)
    devices = root.find("devices")
    if devices is None:
        devices = ElementTree.SubElement(root, "devices")
    devices.append(ElementTree.fromstring(device))
    return _text(root)


def without_device(domain: str, device: str) -> str:
    """The domain XML without the disk (by target) or interface (by MAC) that `device` names."""
    root = ElementTree.fromstring(domain)
    devices = root.find("devices")
    wanted = _device_key(ElementTree.fromstring(device))
    if devices is not None:
        for element in list(devices):
            if _device_key(element) == wanted:
                devices.remove(element)
    return _text(root)


def _device_key(element: ElementTree.Element) -> tuple[str, str]:
    if element.tag == "disk":
        target = element.find("target")
        return ("disk", "" if target is None else target.get("dev", ""))
    if element.tag == "interface":
        mac = element.find("mac")
        return ("interface", "" if mac is None else mac.get("address", "").lower())
    return (element.tag, "")


def _text(element: ElementTree.Element) -> str:
    ElementTree.register_namespace(PREFIX, NAMESPACE)
    return ElementTree.tostring(element, encoding="unicode")
