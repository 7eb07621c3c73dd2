"""The test daemons themselves: etcd and Redis really answer."""

from __future__ import annotations

import socket

from tests.conftest import EtcdEndpoint, RedisEndpoint


def test_redis_answers_ping(redis: RedisEndpoint) -> None:
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(16).startswith(b"+PONG")


def test_etcd_is_listening(etcd: EtcdEndpoint) -> None:
    with socket.create_connection((etcd.host, etcd.port), timeout=2):
        pass
    assert etcd.daemon.alive()
