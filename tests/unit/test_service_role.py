"""The `service` role: opens service-to-service RPCs, and nothing of any project."""

from __future__ import annotations

import pytest

from services.common import errors, policy
from services.common.context import Principal, ProjectId, UserId


def _who(*roles: str) -> Principal:
    return Principal(UserId("u"), "user", ProjectId("p-svc"), frozenset(roles))


@pytest.mark.parametrize(
    ("roles", "allowed"),
    [(("service",), True), (("cloud-admin",), True), (("admin",), False),
     (("member", "reader"), False), ((), False)],
)
def test_service_rule_takes_service_or_cloud_admin(roles: tuple[str, ...], allowed: bool) -> None:
    rule = policy.service_or_cloud_admin()
    if allowed:
        policy.authorize(_who(*roles), rule)
    else:
        with pytest.raises(errors.PermissionDenied):
            policy.authorize(_who(*roles), rule)


@pytest.mark.parametrize("rule", [policy.reader(), policy.member(), policy.admin(),
                                  policy.cloud_admin()])
def test_service_role_grants_no_other_rule(rule: policy.Rule) -> None:
    with pytest.raises(errors.PermissionDenied):
        policy.authorize(_who("service"), rule)


def test_service_role_is_cloud_wide_and_sees_no_project() -> None:
    assert policy.Role.SERVICE in policy.CLOUD_ROLES
    assert policy.Role.SERVICE not in policy.PROJECT_ROLES
    assert policy.service_or_cloud_admin().mutating
    with pytest.raises(errors.NotFound):
        policy.require_visible(_who("service"), "p-a", "server group", "g1")
