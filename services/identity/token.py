"""Tokens: signing keys, password logins (throttled), issuing and revoking Ed25519 JWTs."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nubis.identity.v1 import identity_pb2

from services.common import auth, errors, policy, resources
from services.common.context import Principal
from services.common.settings import AuthSettings
from services.common.store import Store, Txn
from services.identity import keys, project, revocation, role, throttle, user

_BAD_LOGIN = "invalid username or password"


@dataclass(frozen=True)
class SigningKey:
    """The active private key and the id that tokens name in their header."""

    kid: str
    private_key: Ed25519PrivateKey

    def public_pem(self) -> str:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()


def _kid(private_key: Ed25519PrivateKey) -> str:
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def _from_pem(pem: bytes) -> SigningKey:
    private = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise errors.FailedPrecondition(
            "the signing key is not an Ed25519 key", reason="nubis.identity.bad_signing_key"
        )
    return SigningKey(_kid(private), private)


def _stored(key: SigningKey) -> identity_pb2.PrivateSigningKey:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return identity_pb2.PrivateSigningKey(kid=key.kid, private_key_pem=pem,
                                          create_time=resources.now())


def _published(key: SigningKey) -> identity_pb2.SigningKey:
    return identity_pb2.SigningKey(kid=key.kid, algorithm=auth.ALGORITHM,
                                   public_key_pem=key.public_pem(), create_time=resources.now())


async def _publish(store: Store, key: SigningKey) -> None:
    async def body(txn: Txn) -> None:
        if await txn.get(keys.public_key(key.kid), identity_pb2.SigningKey) is None:
            txn.put(keys.public_key(key.kid), _published(key))

    await store.atomic(body)


async def public_keys(store: Store) -> list[identity_pb2.SigningKey]:
    """Every published verification key (the active one and those still verifying)."""
    items, _ = await store.list_all(keys.PUBLIC_KEYS, identity_pb2.SigningKey)
    return [item.value for item in items]


async def active_key(store: Store, settings: AuthSettings) -> SigningKey:
    """The key new tokens are signed with: from the key file, else from etcd (made once)."""
    if settings.signing_key_file:
        pem = await asyncio.to_thread(Path(settings.signing_key_file).read_bytes)
        key = _from_pem(pem)
        await _publish(store, key)
        return key
    stored = await store.find(keys.SIGNING_KEY, identity_pb2.PrivateSigningKey)
    if stored is not None:
        return _from_pem(stored.value.private_key_pem.encode())
    return await rotate(store, only_if_missing=True)


async def rotate(store: Store, *, only_if_missing: bool = False) -> SigningKey:
    """Make a new active key; the old public keys stay so issued tokens keep verifying."""
    fresh_key = SigningKey("", Ed25519PrivateKey.generate())
    fresh_key = SigningKey(_kid(fresh_key.private_key), fresh_key.private_key)

    async def body(txn: Txn) -> SigningKey:
        current = await txn.get(keys.SIGNING_KEY, identity_pb2.PrivateSigningKey)
        if current is not None and only_if_missing:
            # Another replica made the first key while we were deciding: use it.
            return _from_pem(current.value.private_key_pem.encode())
        txn.put(keys.SIGNING_KEY, _stored(fresh_key))
        txn.put(keys.public_key(fresh_key.kid), _published(fresh_key))
        return fresh_key

    return await store.atomic(body)


@dataclass
class Issuer:
    """Everything Authenticate needs, built once per process."""

    store: Store
    settings: AuthSettings
    hasher: user.PasswordHasher
    throttle: throttle.LoginThrottle


async def authenticate(
    issuer: Issuer, username: str, password: str, project_ref: str
) -> identity_pb2.AuthenticateResponse:
    """Check the password, pick the project, and sign a token carrying the roles there."""
    violations = errors.ViolationCollector()
    if not username:
        violations.add("username", "required")
    if not password:
        violations.add("password", "required")
    violations.check("invalid credentials request")
    # Counted before the hash is awaited: parallel guesses cannot all get through.
    await issuer.throttle.attempt(username)
    account = await user.find_by_name(issuer.store, username)
    stored_hash = await user.password_hash(issuer.store, account.meta.id) if account else None
    # Verified first, also for an unknown name (against the decoy), so that a
    # name that does not exist costs the time of a wrong password.
    matched = await issuer.hasher.verify(stored_hash, password)
    if account is None or not matched:
        raise errors.Unauthenticated(_BAD_LOGIN, reason="nubis.auth.invalid_credentials")
    await issuer.throttle.succeeded(username)
    if not account.enabled:
        raise errors.Unauthenticated("user is disabled", reason="nubis.auth.user_disabled")
    scoped = await _scope(issuer.store, account, project_ref)
    roles = await role.roles_of(issuer.store, account.meta.id, scoped.meta.id)
    if not roles:
        raise errors.PermissionDenied(
            "the user has no role on this project", reason="nubis.auth.no_role",
            metadata={"project_id": scoped.meta.id},
        )
    key = await active_key(issuer.store, issuer.settings)
    return sign(key, account, scoped.meta.id, sorted(roles), issuer.settings.token_ttl)


async def _scope(
    store: Store, account: identity_pb2.User, project_ref: str
) -> identity_pb2.Project:
    ref = project_ref or account.default_project_id
    if not ref:
        raise errors.InvalidArgument(
            "name a project: the user has no default project",
            violations=[errors.FieldViolation("project", "required (no default project)")],
        )
    try:
        scoped = await project.resolve(store, ref)
    except errors.NotFound:
        raise errors.PermissionDenied(
            "the user has no role on this project", reason="nubis.auth.no_role"
        ) from None
    if not scoped.enabled:
        raise errors.Unauthenticated("project is disabled", reason="nubis.auth.project_disabled")
    return scoped


def sign(key: SigningKey, account: identity_pb2.User, project_id: str, roles: list[str],
          ttl: int) -> identity_pb2.AuthenticateResponse:
    issued = time.time()
    token_id = str(uuid.uuid4())
    claims = {
        "iss": auth.ISSUER, "sub": account.meta.id, "name": account.meta.name,
        "project": project_id, "roles": roles, "jti": token_id,
        # Sub-second issue time: a revocation in the same second as a later
        # re-enable must not revoke the fresh token.
        "iat": round(issued, 6), "exp": int(issued) + ttl,
    }
    token = jwt.encode(claims, key.private_key, algorithm=auth.ALGORITHM,
                       headers={"kid": key.kid})
    response = identity_pb2.AuthenticateResponse(
        token=token, token_id=token_id, user_id=account.meta.id, project_id=project_id,
        roles=roles,
    )
    response.expire_time.FromSeconds(int(issued) + ttl)
    return response


async def revoke(
    store: Store, verifier: auth.TokenVerifier, principal: Principal, token: str, token_id: str,
    *, token_ttl: int,
) -> None:
    """Revoke a token by value (its holder) or by id (cloud-admin); repeating is harmless."""
    if bool(token) == bool(token_id):
        raise errors.InvalidArgument(
            "give exactly one of token or token_id",
            violations=[errors.FieldViolation("token", "exactly one of token, token_id")],
        )
    if token_id:
        if not policy.is_cloud_admin(principal):
            raise errors.PermissionDenied(
                "revoking by id needs the cloud-admin role", reason="nubis.policy.denied"
            )
        # Token ids are UUIDs; anything else would become a junk revocation key.
        resources.check_id(token_id, "token_id")
        await revocation.revoke_token(store, token_id, time.time() + token_ttl)
        verifier.note_revoked(token_id, time.time() + token_ttl)
        return
    try:
        target = verifier.verify(token)
    except errors.Unauthenticated as exc:
        if exc.reason in ("nubis.auth.token_revoked", "nubis.auth.token_expired"):
            return  # already unusable
        raise errors.InvalidArgument(
            "not a valid token", violations=[errors.FieldViolation("token", exc.message)]
        ) from None
    await revocation.revoke_token(store, target.token_id, target.expires_at)
    verifier.note_revoked(target.token_id, target.expires_at)
