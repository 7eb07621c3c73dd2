"""The policy table and scoping rules, as pure functions of a principal."""

from __future__ import annotations

import pytest

from services.common import errors, policy
from services.common.context import Principal, ProjectId, UserId


def _who(*roles: str, project: str = "p-a") -> Principal:
    return Principal(UserId("u"), "user", ProjectId(project), frozenset(roles))


@pytest.mark.parametrize(
    ("roles", "rule", "allowed"),
    [
        (("reader",), policy.reader(), True),
        (("reader",), policy.member(), False),
        (("member",), policy.member(), True),
        (("member",), policy.admin(), False),
        (("admin",), policy.member(), True),
        (("admin",), policy.reader(), True),
        (("admin",), policy.cloud_admin(), False),
        (("cloud-admin",), policy.admin(), True),
        (("cloud-admin",), policy.cloud_admin(), True),
        ((), policy.reader(), False),
        ((), policy.authenticated(), True),
        (("bogus-role",), policy.reader(), False),
    ],
)
def test_role_hierarchy(roles: tuple[str, ...], rule: policy.Rule, allowed: bool) -> None:
    if allowed:
        policy.authorize(_who(*roles), rule)
    else:
        with pytest.raises(errors.PermissionDenied):
            policy.authorize(_who(*roles), rule)


def test_unknown_method_is_denied() -> None:
    with pytest.raises(errors.PermissionDenied) as denied:
        policy.check({"/svc/Known": policy.reader()}, "/svc/Unknown", _who("admin"))
    assert denied.value.reason == "nubis.policy.denied"


def test_other_projects_are_not_found_not_denied() -> None:
    with pytest.raises(errors.NotFound):
        policy.require_visible(_who("admin", project="p-b"), "p-a", "network", "n1")
    policy.require_visible(_who("reader", project="p-a"), "p-a", "network", "n1")
    policy.require_visible(_who("cloud-admin", project="ops"), "p-a", "network", "n1")


def test_listing_every_project_needs_cloud_admin_and_the_flag() -> None:
    assert policy.list_scope(_who("cloud-admin", project="ops"), all_projects=False) == "ops"
    assert policy.list_scope(_who("cloud-admin"), all_projects=True) is None
    with pytest.raises(errors.PermissionDenied):
        policy.list_scope(_who("admin"), all_projects=True)


def test_mutating_flag_follows_the_rule() -> None:
    assert not policy.reader().mutating
    assert policy.member().mutating
    assert policy.cloud_admin().mutating
