"""The scheduler's etcd keys (relative to the store root), one function per record."""

from __future__ import annotations

from services.common import resources

NODE_REPORTS = "nodes/"
NODE_SETTINGS = "placement/nodes/"
NODE_USAGE = "placement/usage/"
ALLOCATIONS = "placement/allocations/"
SERVER_GROUPS = "placement/server-groups/"
# Cloud-wide defaults; `cloud` is the one record today (room for per-zone ones).
DEFAULT_RATIOS = "placement/default-ratios/"
CLOUD_RATIOS = "cloud"


def node_report(name: str) -> str:
    """Leased; written only by the node's agent."""
    return resources.key(NODE_REPORTS, name)


def node_settings(name: str) -> str:
    return resources.key(NODE_SETTINGS, name)


def node_usage(name: str) -> str:
    """Its mod_revision is the node's allocation generation."""
    return resources.key(NODE_USAGE, name)


def allocations(consumer_id: str) -> str:
    return resources.key(ALLOCATIONS, consumer_id)


def server_group(group_id: str) -> str:
    return resources.key(SERVER_GROUPS, group_id)


def default_ratios() -> str:
    """The cloud's default allocation ratios, which every claim compares."""
    return resources.key(DEFAULT_RATIOS, CLOUD_RATIOS)
