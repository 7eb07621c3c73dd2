"""Authorization matrix: every RPC of every service against every kind of caller."""
