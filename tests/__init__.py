"""nubis test suite."""
