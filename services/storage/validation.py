"""Storage's own checks on request fields: sizes, formats, checksums, states.

Ids, names, labels, masks and page tokens every service shares are in
``services.common.resources`` and ``services.common.pages``.
"""

from __future__ import annotations
