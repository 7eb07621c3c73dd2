"""Shared building blocks: settings, etcd store, gRPC bootstrap, errors, auth, logs, metrics."""
