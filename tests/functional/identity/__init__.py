"""Functional tests of the identity service and the shared auth/quota helpers."""
