"""Shared building blocks: settings, the etcd store, the gRPC server bootstrap, errors, auth, logging, metrics."""
