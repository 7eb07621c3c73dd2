"""Compute's etcd keys (relative to the store root), one function per record."""

from __future__ import annotations

from services.common import resources

FLAVORS = "compute/flavors/"
FLAVOR_NAMES = "compute/flavor-names/"
DEFAULT_FLAVORS = "compute/default-flavors"
KEYPAIRS = "compute/keypairs/"
KEYPAIR_NAMES = "compute/keypair-names/"
INSTANCES = "compute/instances/"
ACTIONS = "compute/actions/"
OPERATIONS = "compute/operations/"


def flavor(flavor_id: str) -> str:
    return resources.key(FLAVORS, flavor_id)


def flavor_name(name: str) -> str:
    """Flavor names are unique cloud-wide: the index key holds the flavor's id."""
    return resources.key(FLAVOR_NAMES, name)


def keypair(keypair_id: str) -> str:
    return resources.key(KEYPAIRS, keypair_id)


def keypair_name(user_id: str, name: str) -> str:
    """Key pair names are unique per user (as in Nova): the index key holds the id."""
    return resources.key(KEYPAIR_NAMES, user_id, name)


def instance(instance_id: str) -> str:
    return resources.key(INSTANCES, instance_id)


def action(instance_id: str, action_id: str) -> str:
    return resources.key(ACTIONS, instance_id, action_id)


def actions(instance_id: str) -> str:
    """Prefix of every action of one instance."""
    return resources.key(ACTIONS, instance_id, "")


def operation(instance_id: str) -> str:
    """The operation in flight on an instance (at most one at a time)."""
    return resources.key(OPERATIONS, instance_id)
