"""Prometheus metrics of the scheduler's claims: lost races between replicas.

The counters are made outside any registry; `register` adds them to the
server's own registry, so they appear on its ``/metrics`` port beside the
RPC metrics (one registry per server, see services/common/metrics.py).
"""

from __future__ import annotations

import prometheus_client


class ClaimMetrics:
    """What operators read to tell replicas racing for the same nodes."""

    def __init__(self) -> None:
        self.claims = prometheus_client.Counter(
            "nubis_scheduler_claims",
            "Claim transactions committed (one per placed request).",
            registry=None,
        )
        self.conflicts = prometheus_client.Counter(
            "nubis_scheduler_claim_conflicts",
            "Claim transactions whose compare failed (another replica, or a fresher "
            "record, got there first), each followed by a new plan.",
            registry=None,
        )

    def register(self, registry: prometheus_client.CollectorRegistry) -> None:
        """Expose the counters through `registry`."""
        registry.register(self.claims)
        registry.register(self.conflicts)
