"""The shared resource pieces: ids, metadata, name/label/mask checks and key segments."""

from __future__ import annotations

import pytest
from nubis.common.v1 import resource_pb2
from nubis.identity.v1 import identity_pb2

from services.common import errors, resources
from services.common.context import Principal, ProjectId, UserId


def test_new_ids_are_uuids_the_check_accepts() -> None:
    first, second = resources.new_id(), resources.new_id()
    assert first != second
    assert resources.is_uuid(first)
    assert resources.check_id(first) == first


@pytest.mark.parametrize("value", ["", "web-1", "6F9619FF-8B86-D011-B42D-00C04FC964FF",
                                   "6f9619ff8b86d011b42d00c04fc964ff", "../x"])
def test_a_malformed_id_is_invalid_argument_naming_the_field(value: str) -> None:
    with pytest.raises(errors.InvalidArgument) as raised:
        resources.check_id(value, "user_id")
    assert raised.value.message == "user_id must be a UUID"
    assert [v.field for v in raised.value.violations] == ["user_id"]


def test_fresh_meta_keeps_what_the_caller_may_set_and_owns_the_rest() -> None:
    sent = resource_pb2.ResourceMeta(id="mine", name="web", project_id="other", revision=9,
                                     labels={"env": "prod"}, description="d")
    sent.create_time.FromSeconds(1)
    meta = resources.fresh_meta(sent, "p1")
    assert (meta.name, meta.description, dict(meta.labels)) == ("web", "d", {"env": "prod"})
    assert meta.project_id == "p1" and meta.revision == 0
    assert resources.is_uuid(meta.id)
    assert meta.create_time == meta.update_time and meta.create_time.seconds > 1


@pytest.mark.parametrize(("name", "ok"), [
    ("web-1", True), ("a@b.c", True), ("a" * 63, True), ("a" * 64, False),
    ("-web", False), ("", False), ("we b", False), ("wé", False),
])
def test_names(name: str, ok: bool) -> None:
    found = errors.ViolationCollector()
    resources.check_name(found, "project.meta.name", name)
    assert resources.is_name(name) is ok
    if ok:
        found.check()
    else:
        with pytest.raises(errors.InvalidArgument):
            found.check()


def test_labels() -> None:
    found = errors.ViolationCollector()
    resources.check_labels(found, "meta.labels", {"ok": "v", "": "v", "k" * 64: "v",
                                                  "long": "v" * 256})
    with pytest.raises(errors.InvalidArgument) as raised:
        found.check()
    assert sorted(v.field for v in raised.value.violations) == sorted(
        ["meta.labels.", f"meta.labels.{'k' * 64}", "meta.labels.long"])


def test_mask_drops_meta_prefix_and_refuses_unknown_or_empty() -> None:
    assert resources.check_mask(["meta.name", "labels", "enabled"],
                                ["name", "labels", "enabled"]) == ["name", "labels", "enabled"]
    with pytest.raises(errors.InvalidArgument) as raised:
        resources.check_mask([], ["name", "enabled"])
    assert raised.value.violations[0].description == "name at least one of: enabled, meta.name"
    with pytest.raises(errors.InvalidArgument) as raised:
        resources.check_mask(["meta.enabled", "id"], ["name", "enabled"])
    assert [v.description for v in raised.value.violations] == [
        "unknown or read-only field: meta.enabled", "unknown or read-only field: id"]


def test_method_and_scope() -> None:
    found = resources.method(identity_pb2.DESCRIPTOR, "IdentityService", "CreateUser")
    assert found.full_name == "nubis.identity.v1.IdentityService.CreateUser"
    assert resources.scope(None) == ""
    caller = Principal(user_id=UserId("u"), user_name="u", project_id=ProjectId("p"))
    assert resources.scope(caller) == "p"


def test_keys_put_records_without_a_project_in_the_cloud_scope() -> None:
    assert resources.key("identity/users/", "u1") == "identity/users/u1"
    assert resources.scoped("requests/", "p1", "r1") == "requests/p1/r1"
    assert resources.scoped("requests/", "", "r1") == "requests/_cloud/r1"
    assert resources.scoped("identity/roles/", "", "u1", "") == "identity/roles/_cloud/u1/"
    assert resources.name_of("nodes/node-1", "nodes/") == "node-1"
