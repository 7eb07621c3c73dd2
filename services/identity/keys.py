"""Where identity keeps each record in etcd (relative to the store root).

One prefix per noun under ``identity/``; index keys exist only where a lookup
or a uniqueness guarantee needs them.
"""

from __future__ import annotations

from services.common import auth, quota, resources

PROJECTS = "identity/projects/"
PROJECT_NAMES = "identity/project-names/"
USERS = "identity/users/"
USER_NAMES = "identity/user-names/"
CREDENTIALS = "identity/credentials/"
# Role assignments are keyed by project (cloud-admin under resources.CLOUD_SCOPE), then user.
ROLES = "identity/roles/"
CATALOG = "identity/catalog/"
SIGNING_KEY = "identity/signing-key"
LOGIN_FAILURES = "identity/login-failures/"
PUBLIC_KEYS = auth.KEYS_PREFIX
REVOKED = auth.REVOKED_PREFIX


def project(project_id: str) -> str:
    return resources.key(PROJECTS, project_id)


def project_name(name: str) -> str:
    return resources.key(PROJECT_NAMES, name)


def user(user_id: str) -> str:
    return resources.key(USERS, user_id)


def user_name(name: str) -> str:
    return resources.key(USER_NAMES, name)


def credential(user_id: str) -> str:
    return resources.key(CREDENTIALS, user_id)


def role_prefix(project_id: str, user_id: str = "") -> str:
    if user_id:
        return resources.scoped(ROLES, project_id, user_id, "")
    return resources.scoped(ROLES, project_id, "")


def role(project_id: str, user_id: str, role_name: str) -> str:
    return resources.scoped(ROLES, project_id, user_id, role_name)


def public_key(kid: str) -> str:
    return resources.key(PUBLIC_KEYS, kid)


def revoked(token_id: str) -> str:
    return resources.key(REVOKED, token_id)


def revoked_subject(kind: str, subject_id: str, project_id: str = "") -> str:
    return auth.revoked_subject_key(kind, subject_id, project_id)


def login_failures(name_digest: str) -> str:
    """Failed-login count of the user name whose SHA-256 hex digest is `name_digest`."""
    return resources.key(LOGIN_FAILURES, name_digest)


quota_key = quota.quota_key
usage_key = quota.usage_key
usage_keys = quota.usage_keys
legacy_usage_key = quota.legacy_usage_key
QUOTA_DEFAULTS = quota.DEFAULTS_KEY
