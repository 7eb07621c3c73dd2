"""Who may call each SchedulerService RPC: the one place the scheduler's authorization lives.

Nodes and allocations are operator and service-to-service business: reading
nodes (and the cloud's default allocation ratios) and every allocation RPC take
cloud-admin or the `service` role (compute claiming for its instances);
changing a node or the default ratios is cloud-admin only. Server groups
belong to projects (members write, readers read), and the domain narrows them
to the caller's project.
"""

from __future__ import annotations

from services.common import policy

SERVICE = "nubis.scheduler.v1.SchedulerService"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


TABLE: policy.PolicyTable = {
    _method("ListNodes"): policy.service_or_cloud_admin(),
    _method("GetNode"): policy.service_or_cloud_admin(),
    _method("UpdateNode"): policy.cloud_admin(),
    _method("GetDefaultAllocationRatios"): policy.service_or_cloud_admin(),
    _method("UpdateDefaultAllocationRatios"): policy.cloud_admin(),
    _method("SelectDestinations"): policy.service_or_cloud_admin(),
    _method("GetAllocations"): policy.service_or_cloud_admin(),
    _method("ReleaseAllocations"): policy.service_or_cloud_admin(),
    _method("MoveAllocations"): policy.service_or_cloud_admin(),
    _method("CreateServerGroup"): policy.member(),
    _method("GetServerGroup"): policy.reader(),
    _method("ListServerGroups"): policy.reader(),
    _method("DeleteServerGroup"): policy.member(),
}
