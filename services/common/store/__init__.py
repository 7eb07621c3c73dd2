"""The etcd store: the only code in nubis that talks to etcd.

``from services.common.store import Store, Versioned, Page, WatchEvent, Lease, Txn``
"""

from services.common.store.store import Store
from services.common.store.txn import Txn
from services.common.store.types import Lease, Page, Versioned, WatchEvent
from services.common.store.watch import COMPACTED

__all__ = ["COMPACTED", "Lease", "Page", "Store", "Txn", "Versioned", "WatchEvent"]
