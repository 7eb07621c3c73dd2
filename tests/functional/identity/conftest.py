"""Identity's functional tests share the authorization tests' `world` (one per package)."""

from __future__ import annotations

from tests.functional.authz.conftest import world

__all__ = ["world"]
