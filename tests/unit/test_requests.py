"""The request fingerprint of create idempotency: what it covers and what it leaves out."""

from __future__ import annotations

import pytest
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2
from nubis.scheduler.v1 import scheduler_pb2

from services.common import errors, requests


def _user(name: str = "alice", password: str = "correct horse battery",
          request_id: str = "r-1", **labels: str) -> identity_pb2.CreateUserRequest:
    meta = resource_pb2.ResourceMeta(name=name, labels=labels)
    return identity_pb2.CreateUserRequest(user=identity_pb2.User(meta=meta), password=password,
                                          request_id=request_id)


def test_fingerprint_is_deterministic() -> None:
    first = requests.fingerprint(_user(a="1", b="2", c="3"))
    # The same request built again, its map filled in another order.
    again = _user()
    for key in ("c", "a", "b"):
        again.user.meta.labels[key] = {"a": "1", "b": "2", "c": "3"}[key]
    assert requests.fingerprint(again) == first
    assert len(first) == 64 and int(first, 16) >= 0


def test_fingerprint_leaves_out_the_request_id() -> None:
    assert requests.fingerprint(_user(request_id="r-1")) == requests.fingerprint(
        _user(request_id="another-key"))
    assert requests.fingerprint(_user(request_id="r-1")) == requests.fingerprint(
        _user(request_id=""))


def test_fingerprint_leaves_out_secrets_only() -> None:
    secret = ("password",)
    one = requests.fingerprint(_user(password="one password"), secrets=secret)
    assert requests.fingerprint(_user(password="other password"), secrets=secret) == one
    assert requests.fingerprint(_user(password="one password")) != requests.fingerprint(
        _user(password="other password")), "without `secrets`, the password counts"
    assert requests.fingerprint(_user(name="bob"), secrets=secret) != requests.fingerprint(
        _user(name="alice"), secrets=secret), "every other field counts"
    assert requests.fingerprint(_user(env="prod"), secrets=secret) != requests.fingerprint(
        _user(env="dev"), secrets=secret)


def test_fingerprint_leaves_out_nested_secrets() -> None:
    def group(description: str) -> scheduler_pb2.CreateServerGroupRequest:
        meta = resource_pb2.ResourceMeta(name="web", description=description)
        return scheduler_pb2.CreateServerGroupRequest(
            server_group=scheduler_pb2.ServerGroup(meta=meta, policy=scheduler_pb2.AFFINITY))

    secret = ("server_group.meta.description",)
    assert requests.fingerprint(group("a"), secrets=secret) == requests.fingerprint(
        group("b"), secrets=secret)
    assert requests.fingerprint(group("a")) != requests.fingerprint(group("b"))
    # A secret inside an absent message is simply not there.
    assert requests.fingerprint(scheduler_pb2.CreateServerGroupRequest(), secrets=secret) == (
        requests.fingerprint(scheduler_pb2.CreateServerGroupRequest()))


def test_fingerprint_does_not_change_the_request() -> None:
    request = _user()
    requests.fingerprint(request, secrets=("password",))
    assert request == _user()


def test_fingerprint_tells_request_types_apart_only_by_content() -> None:
    """Empty requests of two methods hash alike: the record's `method` tells them apart."""
    assert requests.fingerprint(identity_pb2.CreateProjectRequest()) == requests.fingerprint(
        scheduler_pb2.CreateServerGroupRequest())


@pytest.mark.parametrize("request_id", ["", "-leading", "has space", "a/b", "x" * 129, "é",
                                        "ok\n"])
def test_malformed_request_ids_are_invalid_argument(request_id: str) -> None:
    with pytest.raises(errors.InvalidArgument) as caught:
        requests.check_request_id(request_id)
    assert [v.field for v in caught.value.violations] == ["request_id"]


@pytest.mark.parametrize("request_id", ["a", "0f8c2a4e-1b7d-4c1e-9d3f-5a6b7c8d9e0f",
                                        "retry:1.2_3-4", "x" * 128])
def test_well_formed_request_ids_pass(request_id: str) -> None:
    requests.check_request_id(request_id)


def test_key_layout() -> None:
    assert requests.key("p-1", "r-1") == "requests/p-1/r-1"
    assert requests.key("", "r-1") == "requests/_cloud/r-1"
