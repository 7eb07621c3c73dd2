"""Checks of compute requests that need nothing but the request: every bad field named at once."""

from __future__ import annotations

import re

from nubis.compute.v1 import instance_pb2

from services.common import errors, resources

MAX_USER_DATA = 64 * 1024
MAX_NICS = 16
_HOSTNAME_BAD = re.compile(r"[^a-z0-9-]+")


def hostname_of(name: str) -> str:
    """A DNS-safe hostname made from an instance name (at most 63 characters)."""
    cleaned = _HOSTNAME_BAD.sub("-", name.lower()).strip("-")[:63].strip("-")
    return cleaned or "instance"


def _check_id(violations: errors.ViolationCollector, field: str, value: str) -> None:
    if not resources.is_uuid(value):
        violations.add(field, "must be a UUID")


def _check_source(violations: errors.ViolationCollector, sent: instance_pb2.Instance) -> None:
    if bool(sent.image_id) == bool(sent.boot_volume_id):
        violations.add("instance.image_id", "give exactly one of image_id and boot_volume_id")
    elif sent.image_id:
        _check_id(violations, "instance.image_id", sent.image_id)
    else:
        _check_id(violations, "instance.boot_volume_id", sent.boot_volume_id)


def _check_nics(violations: errors.ViolationCollector, sent: instance_pb2.Instance) -> None:
    if len(sent.networks) > MAX_NICS:
        violations.add("instance.networks", f"at most {MAX_NICS} NICs")
    for index, nic in enumerate(sent.networks):
        target = nic.WhichOneof("target")
        field = f"instance.networks[{index}]"
        if target is None:
            violations.add(field, "give network_id or port_id")
        else:
            _check_id(violations, f"{field}.{target}", getattr(nic, target))
        if nic.fixed_ip and target != "network_id":
            violations.add(f"{field}.fixed_ip", "only with network_id")


_LETTERS = "bcdefghijklmnopqrstuvwxyz"


def _bdm_field(index: int, name: str = "volume_id") -> str:
    return f"instance.block_devices[{index}].{name}"


def _check_block_devices(violations: errors.ViolationCollector,
                         sent: instance_pb2.Instance) -> None:
    """Sources, device names and duplicates of `sent.block_devices`."""
    devices: set[str] = set()
    volumes: set[str] = set()
    for index, device in enumerate(sent.block_devices):
        source = device.WhichOneof("source")
        if source != "volume_id":
            violations.add(_bdm_field(index, source or "volume_id"),
                           "only volume_id is supported (an existing volume)")
            continue
        if device.volume_id in volumes or device.volume_id == sent.boot_volume_id:
            violations.add(_bdm_field(index), f"volume {device.volume_id} is given twice")
        volumes.add(device.volume_id)
        name = device.device_name
        if name and (len(name) != 3 or not name.startswith("vd") or name[2] not in _LETTERS):
            violations.add(_bdm_field(index, "device_name"), "vdb..vdz, or empty for the next free")
        elif name and name in devices:
            violations.add(_bdm_field(index, "device_name"), f"device {name} is given twice")
        devices.add(name)


def _check_extras(violations: errors.ViolationCollector, sent: instance_pb2.Instance) -> None:
    if len(sent.user_data) > MAX_USER_DATA:
        violations.add("instance.user_data", f"at most {MAX_USER_DATA} bytes")
    if sent.server_group_id:
        _check_id(violations, "instance.server_group_id", sent.server_group_id)
    if sent.key_name and not resources.is_name(sent.key_name):
        violations.add("instance.key_name", "not a key pair name")
    _check_block_devices(violations, sent)
    if sent.hostname and hostname_of(sent.hostname) != sent.hostname:
        violations.add("instance.hostname", "1-63 lower-case letters, digits or -")
    for index, group in enumerate(sent.security_groups):
        if not (resources.is_uuid(group) or resources.is_name(group)):
            violations.add(f"instance.security_groups[{index}]", "a security group id or name")


def check_create(sent: instance_pb2.Instance) -> None:
    """The requested shape of a CreateInstance, or INVALID_ARGUMENT naming every bad field."""
    violations = errors.ViolationCollector()
    resources.check_name(violations, "instance.meta.name", sent.meta.name)
    resources.check_labels(violations, "instance.meta.labels", dict(sent.meta.labels))
    _check_id(violations, "instance.flavor_id", sent.flavor_id)
    _check_source(violations, sent)
    _check_nics(violations, sent)
    _check_extras(violations, sent)
    named = ", ".join(f"{v.field} {v.description}" for v in violations.violations)
    violations.check(f"invalid instance: {named}")
