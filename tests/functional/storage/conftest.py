"""Fixtures of the storage tests."""

from tests.functional.storage.harness import storage
from tests.functional.storage.volume_harness import bare_cloud, cloud

__all__ = ["bare_cloud", "cloud", "storage"]
