"""Domain XML rendered from a DomainSpec: the disks, NICs, console, boot and nubis metadata a
guest gets, read back from the XML itself; and the metadata parsed back from what libvirt
returns (a whole domain, or the bare element)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ElementTree

import pytest
from nubis.agent.v1 import tasks_pb2

from services.agent.driver import domain_xml
from services.common import network_devices

INSTANCE = str(uuid.uuid4())
NETWORK = str(uuid.uuid4())
PORT = str(uuid.uuid4())
VOLUME = str(uuid.uuid4())
PLACEMENT = domain_xml.Placement(domain_type="qemu", arch="x86_64",
                                 console_log="/var/log/nubis/console/x.log")


def spec(**changes: object) -> tasks_pb2.DomainSpec:
    made = tasks_pb2.DomainSpec(
        name=f"instance-{INSTANCE}", uuid=INSTANCE, vcpus=2, memory_mb=512,
        project_id="project-1", hostname="web-1",
        disks=[tasks_pb2.DomainDisk(volume_id=VOLUME, path="/pool/volume-1", format="qcow2",
                                    target_dev="vda", boot=True),
               tasks_pb2.DomainDisk(path="/pool/volume-2", format="raw", target_dev="vdb")],
        interfaces=[tasks_pb2.DomainInterface(
            port_id=PORT, mac="52:54:00:AB:CD:EF", network_id=NETWORK, mtu=1450,
            filterref_xml=f"<filterref filter='nubis-port-{PORT}'/>")])
    for field, value in changes.items():
        setattr(made, field, value)
    return made


def rendered(made: tasks_pb2.DomainSpec, placement: domain_xml.Placement = PLACEMENT,
             ) -> ElementTree.Element:
    return ElementTree.fromstring(domain_xml.render(made, placement))


def attr(element: ElementTree.Element, path: str, name: str) -> str | None:
    """Attribute `name` of the child at `path`, which must be there."""
    found = element.find(path)
    assert found is not None, path
    return found.get(name)


def test_a_domain_has_its_name_uuid_size_and_the_nodes_domain_type() -> None:
    root = rendered(spec())
    assert root.get("type") == "qemu"
    assert (root.findtext("name"), root.findtext("uuid")) == (f"instance-{INSTANCE}", INSTANCE)
    memory = root.find("memory")
    assert memory is not None and (memory.get("unit"), memory.text) == ("MiB", "512")
    assert root.findtext("vcpu") == "2"
    os_type = root.find("os/type")
    assert os_type is not None and (os_type.text, os_type.get("arch")) == ("hvm", "x86_64")
    boot = root.find("os/boot")
    assert boot is not None and boot.get("dev") == "hd"
    assert root.find("features/acpi") is not None  # ACPI shutdown reaches the guest
    assert root.find("cpu") is None  # TCG: QEMU's default CPU model
    kvm = rendered(spec(), domain_xml.Placement("kvm", "x86_64", "/log"))
    cpu = kvm.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-model"


def test_disks_are_files_with_their_format_on_virtio_in_order() -> None:
    disks = rendered(spec()).findall("devices/disk")
    assert [(d.get("type"), d.get("device")) for d in disks] == [("file", "disk")] * 2
    assert [attr(d, "source", "file") for d in disks] == ["/pool/volume-1", "/pool/volume-2"]
    assert [attr(d, "driver", "type") for d in disks] == ["qcow2", "raw"]
    assert [(attr(d, "target", "dev"), attr(d, "target", "bus")) for d in disks] == [
        ("vda", "virtio"), ("vdb", "virtio")]
    assert disks[0].findtext("serial") == VOLUME[:20]
    assert disks[1].find("serial") is None


def test_a_nic_is_the_ports_tap_on_its_networks_bridge_with_its_filter() -> None:
    interface = rendered(spec()).find("devices/interface")
    assert interface is not None and interface.get("type") == "bridge"
    assert attr(interface, "mac", "address") == "52:54:00:ab:cd:ef"
    assert attr(interface, "source", "bridge") == network_devices.bridge(NETWORK)
    assert attr(interface, "target", "dev") == network_devices.tap(PORT)
    assert attr(interface, "model", "type") == "virtio"
    assert attr(interface, "mtu", "size") == "1450"
    assert attr(interface, "filterref", "filter") == f"nubis-port-{PORT}"
    bare = spec()
    bare.interfaces[0].filterref_xml = ""
    bare.interfaces[0].mtu = 0
    plain = rendered(bare).find("devices/interface")
    assert plain is not None and plain.find("filterref") is None and plain.find("mtu") is None


def test_the_serial_console_is_logged_to_the_placements_file() -> None:
    root = rendered(spec())
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "pty"
    assert attr(serial, "log", "file") == "/var/log/nubis/console/x.log"
    console = root.find("devices/console")
    assert console is not None and attr(console, "target", "type") == "serial"
    assert domain_xml.console_log_path(domain_xml.render(spec(), PLACEMENT)) == (
        "/var/log/nubis/console/x.log")


def test_a_kernel_boot_names_the_cached_kernel_initrd_and_command_line() -> None:
    made = spec()
    made.kernel_boot.cmdline = "console=ttyS0 quiet"
    made.kernel_boot.kernel.image_id = str(uuid.uuid4())
    placement = domain_xml.Placement("qemu", "x86_64", "/log", kernel_path="/cache/image-k",
                                     ramdisk_path="/cache/image-r")
    os_element = rendered(made, placement).find("os")
    assert os_element is not None
    assert (os_element.findtext("kernel"), os_element.findtext("initrd"),
            os_element.findtext("cmdline")) == ("/cache/image-k", "/cache/image-r",
                                                "console=ttyS0 quiet")
    assert os_element.find("boot") is None


def test_the_metadata_names_the_instance_and_parses_back() -> None:
    xml = domain_xml.render(spec(), PLACEMENT)
    element = ElementTree.fromstring(xml).find(f"metadata/{domain_xml.METADATA_TAG}")
    assert element is not None and element.get("id") == INSTANCE
    assert 'xmlns:nubis="https://nubis.dev/xmlns/instance/1"' in xml
    expected = domain_xml.InstanceMetadata(INSTANCE, "project-1", "web-1")
    assert domain_xml.parse_metadata(xml) == expected
    # libvirt's virDomainGetMetadata answers the element without its prefix.
    assert domain_xml.parse_metadata(
        f'<instance id="{INSTANCE}" project="project-1" hostname="web-1"/>') == expected
    assert domain_xml.parse_metadata(domain_xml.metadata_xml(spec())) == expected
    assert domain_xml.parse_metadata("<domain><name>test</name></domain>") is None


def test_devices_are_found_added_and_removed_by_target_or_mac() -> None:
    xml = domain_xml.render(spec(), PLACEMENT)
    assert domain_xml.device_names(xml) == (["vda", "vdb"], ["52:54:00:ab:cd:ef"])
    assert domain_xml.find_disk(xml, "vdb") is not None
    assert domain_xml.find_disk(xml, "vdc") is None
    assert domain_xml.find_interface(xml, "52:54:00:AB:CD:EF") is not None
    extra = tasks_pb2.DomainDisk(path="/pool/v3", format="raw", target_dev="vdc")
    grown = domain_xml.with_device(xml, domain_xml.disk_xml(extra))
    assert domain_xml.device_names(grown)[0] == ["vda", "vdb", "vdc"]
    named = tasks_pb2.DomainInterface(mac="52:54:00:ab:cd:ef", port_id=PORT, network_id=NETWORK)
    shrunk = domain_xml.without_device(grown, domain_xml.interface_xml(named))
    assert domain_xml.device_names(shrunk) == (["vda", "vdb", "vdc"], [])


@pytest.mark.parametrize("fragment", ["<filterref/>", "<mac address='x'/>", "not xml <"])
def test_a_fragment_that_is_not_a_filterref_is_refused(fragment: str) -> None:
    with pytest.raises(ValueError):
        domain_xml.filterref(fragment)


def test_a_tcg_guests_vcpus_get_the_scheduling_class_asked_and_a_kvm_guests_never() -> None:
    assert rendered(spec()).find("cputune") is None
    idle = rendered(spec(), domain_xml.Placement("qemu", "x86_64", "/log",
                                                 tcg_vcpu_scheduler="idle"))
    sched = idle.find("cputune/vcpusched")
    assert sched is not None and (sched.get("vcpus"), sched.get("scheduler")) == ("0-1", "idle")
    kvm = rendered(spec(), domain_xml.Placement("kvm", "x86_64", "/log",
                                                tcg_vcpu_scheduler="idle"))
    assert kvm.find("cputune") is None
