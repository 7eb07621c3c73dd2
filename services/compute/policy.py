"""Who may call each ComputeService RPC: the one place compute's authorization lives.

Instances and key pairs belong to projects: readers read (Get, List, Watch,
console log, actions), members change them, and the domain narrows everything
to the caller's project (another project's instance is NOT_FOUND). Flavors are
cloud-wide: anyone with a project role reads the ones visible to it, and only
cloud-admins create, change, delete them or grant access. Moving an instance
between nodes (migrate, live migrate, evacuate) and resetting its state are
operator calls (cloud-admin).
"""

from __future__ import annotations

from services.common import policy

SERVICE = "nubis.compute.v1.ComputeService"


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


_READERS = (
    "GetFlavor", "ListFlavors", "GetKeyPair", "ListKeyPairs", "GetInstance", "ListInstances",
    "WatchInstances", "GetConsoleLog", "ListInstanceActions", "GetInstanceAction",
)
_MEMBERS = (
    "CreateKeyPair", "UpdateKeyPair", "DeleteKeyPair", "CreateInstance", "UpdateInstance",
    "DeleteInstance", "StartInstance", "StopInstance", "RebootInstance", "ResizeInstance",
    "ConfirmResize", "RevertResize", "RebuildInstance", "AttachVolume", "DetachVolume",
    "AttachPort", "DetachPort",
)
_CLOUD_ADMINS = (
    "CreateFlavor", "UpdateFlavor", "DeleteFlavor", "AddFlavorAccess", "RemoveFlavorAccess",
    "MigrateInstance", "LiveMigrateInstance", "EvacuateInstance", "ResetInstanceState",
)

TABLE: policy.PolicyTable = {
    **{_method(name): policy.reader_or_service() for name in _READERS},
    **{_method(name): policy.member() for name in _MEMBERS},
    **{_method(name): policy.cloud_admin() for name in _CLOUD_ADMINS},
}
