"""Unit tests: pure functions, no processes."""
