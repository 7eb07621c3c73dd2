"""Functional tests: real gRPC servers, real etcd and Redis, real Celery workers."""
