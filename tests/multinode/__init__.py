"""Tests of nubis spread over several hosts (network namespaces)."""
