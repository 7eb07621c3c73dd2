"""TokenVerifier on a real store: keys and revocations arrive by watch; bad tokens are refused."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nubis.identity.v1 import identity_pb2

from services.common import auth, errors
from services.common.store import Store

KID = "test-kid"


def _pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _token(key: Ed25519PrivateKey, kid: str = KID, **overrides: Any) -> str:
    now = time.time()
    claims: dict[str, Any] = {
        "iss": auth.ISSUER, "sub": "user-1", "name": "alice", "project": "proj-1",
        "roles": ["member"], "jti": str(uuid.uuid4()), "iat": now, "exp": int(now) + 600,
    }
    claims.update(overrides)
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


@pytest.fixture
async def signer(store: Store) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    await store.create(f"{auth.KEYS_PREFIX}{KID}",
                       identity_pb2.SigningKey(kid=KID, algorithm="EdDSA",
                                               public_key_pem=_pem(key)))
    return key


@pytest.fixture
async def verifier(store: Store, signer: Ed25519PrivateKey) -> AsyncIterator[auth.TokenVerifier]:
    started = auth.TokenVerifier(store, resync_interval=30)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def _eventually_refused(verifier: auth.TokenVerifier, token: str, reason: str) -> None:
    for _ in range(100):
        try:
            verifier.verify(token)
        except errors.Unauthenticated as exc:
            assert exc.reason == reason
            return
        await asyncio.sleep(0.05)
    pytest.fail("token still accepted after 5 s")


async def test_valid_token_gives_principal(verifier: auth.TokenVerifier,
                                           signer: Ed25519PrivateKey) -> None:
    principal = verifier.verify(_token(signer))
    assert (principal.user_id, principal.project_id, principal.roles) == (
        "user-1", "proj-1", frozenset({"member"}))


def _tampered(token: str) -> str:
    """The token with its payload's claims changed, its signature kept."""
    head, _, signature = token.split(".")
    body = base64.urlsafe_b64encode(json.dumps({"sub": "admin"}).encode()).decode().rstrip("=")
    return f"{head}.{body}.{signature}"


def _with_header(key: Ed25519PrivateKey, **header: Any) -> str:
    """A token signed with `key` whose header has these fields (PyJWT signs whatever it says)."""
    now = time.time()
    claims = {"iss": auth.ISSUER, "sub": "user-1", "project": "proj-1", "roles": ["member"],
              "jti": str(uuid.uuid4()), "iat": now, "exp": int(now) + 600}
    encoded = [base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
               for part in ({"alg": "EdDSA", "kid": KID, **header}, claims)]
    signature = key.sign(".".join(encoded).encode())
    return ".".join([*encoded, base64.urlsafe_b64encode(signature).decode().rstrip("=")])


@pytest.mark.parametrize("case", ["expired", "forged", "unknown-kid", "garbage", "no-roles",
                                  "wrong-issuer", "alg-none", "deep-header", "tampered",
                                  "no-jti", "future-iat", "future-nbf", "audience",
                                  "sub-not-string", "exp-not-number", "exp-infinite", "crit",
                                  "unencoded", "alg-hs256", "short-signature", "non-ascii",
                                  "two-parts"])
async def test_bad_tokens_are_refused(verifier: auth.TokenVerifier, signer: Ed25519PrivateKey,
                                      case: str) -> None:
    stranger = Ed25519PrivateKey.generate()
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: _token(signer, exp=int(time.time()) - 5),
        "forged": lambda: _token(stranger),
        "unknown-kid": lambda: _token(signer, kid="other"),
        "garbage": lambda: "not.a.token",
        "no-roles": lambda: _token(signer, roles="admin"),
        "wrong-issuer": lambda: _token(signer, iss="someone-else"),
        "alg-none": lambda: jwt.encode({"sub": "x"}, "", algorithm="none",
                                       headers={"kid": KID}),
        # A header nested deeper than the parser's recursion limit (~4 KB of metadata).
        "deep-header": lambda: base64.urlsafe_b64encode(b"[" * 3000).decode() + ".e30.sig",
        "tampered": lambda: _tampered(_token(signer)),
        "no-jti": lambda: _token(signer, jti=None),
        "future-iat": lambda: _token(signer, iat=time.time() + 60),
        "future-nbf": lambda: _token(signer, nbf=int(time.time()) + 60),
        "audience": lambda: _token(signer, aud="another-cloud"),
        "sub-not-string": lambda: _token(signer, sub=7),
        "exp-not-number": lambda: _token(signer, exp="tomorrow"),
        "exp-infinite": lambda: _token(signer, exp=float("inf")),
        "crit": lambda: _with_header(signer, crit=["exp"]),
        "unencoded": lambda: _with_header(signer, b64=False, crit=["b64"]),
        "alg-hs256": lambda: jwt.encode({"sub": "x"}, "secret-of-32-bytes-or-more-000000",
                                        algorithm="HS256", headers={"kid": KID}),
        "short-signature": lambda: _token(signer).rsplit(".", 1)[0] + ".AAAA",
        "non-ascii": lambda: _token(signer) + "é",
        "two-parts": lambda: _token(signer).rsplit(".", 1)[0],
    }
    with pytest.raises(errors.Unauthenticated):
        verifier.verify(tokens[case]())


async def test_revocation_by_id_arrives_by_watch(store: Store, verifier: auth.TokenVerifier,
                                                 signer: Ed25519PrivateKey) -> None:
    token = _token(signer)
    token_id = verifier.verify(token).token_id
    verifier.verify(token)  # now cached: the cache must not hide the revocation
    await store.create(f"{auth.REVOKED_PREFIX}{token_id}",
                       identity_pb2.RevokedToken(token_id=token_id))
    await _eventually_refused(verifier, token, "nubis.auth.token_revoked")


async def test_user_revocation_spares_later_tokens(store: Store, verifier: auth.TokenVerifier,
                                                   signer: Ed25519PrivateKey) -> None:
    old = _token(signer, iat=time.time() - 10)
    subject = identity_pb2.RevokedSubject(kind="user", id="user-1")
    subject.revoke_time.GetCurrentTime()
    await store.create(auth.revoked_subject_key("user", "user-1"), subject)
    await _eventually_refused(verifier, old, "nubis.auth.token_revoked")
    await asyncio.sleep(0.01)
    verifier.verify(_token(signer))


async def test_removed_key_stops_verifying(store: Store, verifier: auth.TokenVerifier,
                                           signer: Ed25519PrivateKey) -> None:
    token = _token(signer)
    verifier.verify(token)
    await store.delete(f"{auth.KEYS_PREFIX}{KID}")
    await _eventually_refused(verifier, token, "nubis.auth.invalid_token")


async def test_bearer_header_parsing() -> None:
    assert auth.bearer_token({"authorization": "Bearer abc"}) == "abc"
    for bad in ({}, {"authorization": "Basic abc"}, {"authorization": "Bearer "}):
        with pytest.raises(errors.Unauthenticated):
            auth.bearer_token(bad)
