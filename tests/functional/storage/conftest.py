"""Fixtures of the storage tests."""

from tests.functional.storage.harness import storage

__all__ = ["storage"]
