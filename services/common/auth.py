"""Local token verification: every service checks identity's Ed25519 JWTs without calling it.

`TokenVerifier` keeps identity's public keys (``identity/keys/<kid>``) and the
revocation lists (revoked token ids, and users/projects whose older tokens are
all revoked) in memory, fed by etcd watches, so a revocation reaches every
service within moments. The watches run supervised (services.common.supervise):
an etcd outage backs off and resumes from the last revision seen, a compacted
history or the periodic backstop re-lists, an undecodable record is logged and
skipped. `TokenAuthenticator` is the server bootstrap's auth hook: bearer
token → verified `Principal` → the service's policy table.

A token is checked here by hand, as PyJWT's `decode` would with the options
identity's tokens need (EdDSA only, the required claims, `exp`, `iat`, `nbf`,
`iss`, no `aud`, string `sub` and `jti`), and its signature by OpenSSL through
services.common.ed25519: PyJWT imports `cryptography` as a whole, some 13 MiB in
each service that only verifies tokens. Identity signs with PyJWT.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message
from nubis.identity.v1 import identity_pb2

from services.common import ed25519, errors, policy, supervise
from services.common.context import Principal, ProjectId, UserId
from services.common.store import COMPACTED, Store

log = structlog.get_logger(__name__)

ALGORITHM = "EdDSA"
ISSUER = "nubis-identity"
KEYS_PREFIX = "identity/keys/"
REVOKED_PREFIX = "identity/revoked/"
REVOKED_SUBJECTS_PREFIX = "identity/revoked-subjects/"
_REQUIRED_CLAIMS = ["exp", "iat", "jti", "sub", "project", "roles", "iss"]
# Bounds memory; a full cache is simply emptied (a miss only costs one signature check).
_CACHE_LIMIT = 10_000
# A base64url segment without padding (RFC 7515 §2), ASCII only.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")

M = TypeVar("M", bound=Message)


def revoked_subject_key(kind: str, subject_id: str, project_id: str = "") -> str:
    """Key of a subject revocation; a user's in one project only ends in ``/<project_id>``."""
    scoped = f"/{project_id}" if project_id else ""
    return f"{REVOKED_SUBJECTS_PREFIX}{kind}/{subject_id}{scoped}"


def _unauthenticated(message: str, reason: str) -> errors.Unauthenticated:
    return errors.Unauthenticated(message, reason=reason)


def _principal(claims: Mapping[str, Any]) -> Principal:
    roles = claims["roles"]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token")
    return Principal(
        user_id=UserId(str(claims["sub"])),
        user_name=str(claims.get("name", "")),
        project_id=ProjectId(str(claims["project"])),
        roles=frozenset(roles),
        token_id=str(claims["jti"]),
        expires_at=float(claims["exp"]),
    )


def _invalid() -> errors.Unauthenticated:
    return _unauthenticated("invalid token", "nubis.auth.invalid_token")


def _json_segment(segment: str) -> dict[str, Any]:
    """A JSON object from one base64url segment of a token, or Unauthenticated."""
    try:
        value = json.loads(_segment_bytes(segment))
    except (ValueError, RecursionError):
        # RecursionError: deeply nested arrays, which json cannot parse.
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token") from None
    if not isinstance(value, dict):
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token")
    return value


def _segment_bytes(segment: str) -> bytes:
    if not _SEGMENT.fullmatch(segment):
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token") from None


def _split(token: str) -> tuple[dict[str, Any], str, str, str]:
    """Header, header segment, payload segment and signature segment of a compact JWS."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_SEGMENT.fullmatch(part) for part in parts):
        raise _unauthenticated("malformed token", "nubis.auth.invalid_token")
    head, body, signature = parts
    return _json_segment(head), head, body, signature


def _check_header(header: Mapping[str, Any]) -> str | None:
    """The key id of an acceptable header; Unauthenticated for another algorithm.

    Only EdDSA is accepted (never ``none``), and no ``crit`` extension (RFC 7515
    §4.1.11: one not understood must be refused) nor an unencoded payload (``b64``).
    """
    if header.get("alg") != ALGORITHM or "crit" in header or header.get("b64", True) is not True:
        raise _invalid()
    kid = header.get("kid")
    return kid if isinstance(kid, str) else None


def _whole(claims: Mapping[str, Any], name: str) -> int:
    """A time claim as whole seconds, as PyJWT reads it (a non-number is malformed)."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid()
    try:
        return int(value)
    except (ValueError, OverflowError):  # NaN, Infinity
        raise _invalid() from None


def _check_claims(claims: Mapping[str, Any], now: float) -> None:
    """PyJWT's claim checks for ``issuer=ISSUER`` and ``require=_REQUIRED_CLAIMS``, no leeway."""
    if any(claims.get(name) is None for name in _REQUIRED_CLAIMS):
        raise _invalid()
    if _whole(claims, "iat") > now:
        raise _invalid()  # issued in the future
    if "nbf" in claims and _whole(claims, "nbf") > now:
        raise _invalid()
    if _whole(claims, "exp") <= now:
        raise _unauthenticated("token expired", "nubis.auth.token_expired")
    if claims["iss"] != ISSUER or claims.get("aud"):
        raise _invalid()  # another issuer's, or meant for an audience nubis is not
    if not isinstance(claims["sub"], str) or not isinstance(claims["jti"], str):
        raise _invalid()


class TokenVerifier:
    """Verifies tokens against identity's published keys and live revocation lists."""

    def __init__(
        self, store: Store, *, resync_interval: float = 30.0,
        restart_policy: supervise.RestartPolicy | None = None,
    ) -> None:
        self._store = store
        self._resync_interval = resync_interval
        self._restart_policy = restart_policy or supervise.RestartPolicy()
        # Per prefix: the revision applied so far (a watch resumes after it).
        self._revisions: dict[str, int] = {}
        self._must_list: set[str] = set()
        self.listings = 0
        """Full listings of a prefix so far (the first ones included)."""
        self.undecodable = 0
        """Records skipped because they did not decode."""
        self._keys: dict[str, ed25519.PublicKey] = {}
        self._revoked_tokens: dict[str, float] = {}
        # (kind, id, project_id or "") → revoke time; see `_check_revoked`.
        self._revoked_subjects: dict[tuple[str, str, str], float] = {}
        # token string → (principal, issued_at); safe because the signature was
        # checked, expiry and revocation are re-checked on every use, and the
        # cache is emptied whenever a key changes.
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load keys and revocations, then follow them with supervised watches."""
        for prefix in self._prefixes():
            self._revisions[prefix] = await self._load(prefix)
        for prefix in self._prefixes():
            self._tasks.append(supervise.start(
                f"token-verifier:{prefix}", functools.partial(self._follow, prefix),
                self._restart_policy,
            ))

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        """The watch tasks, for `ServiceParts.background` (a failed one ends the service)."""
        return list(self._tasks)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        # A task that already failed was reported by the server bootstrap.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @staticmethod
    def _prefixes() -> tuple[str, str, str]:
        return (KEYS_PREFIX, REVOKED_PREFIX, REVOKED_SUBJECTS_PREFIX)

    def _message_type(self, prefix: str) -> type[Message]:
        return {
            KEYS_PREFIX: identity_pb2.SigningKey,
            REVOKED_PREFIX: identity_pb2.RevokedToken,
            REVOKED_SUBJECTS_PREFIX: identity_pb2.RevokedSubject,
        }[prefix]

    async def _load(self, prefix: str) -> int:
        """Replace the in-memory view of `prefix` with a fresh listing; return its revision."""
        items, revision = await self._store.list_all(
            prefix, self._message_type(prefix), on_undecodable=self._skip_undecodable
        )
        self.listings += 1
        if prefix == KEYS_PREFIX:
            self._keys.clear()
            self._cache.clear()
        elif prefix == REVOKED_PREFIX:
            self._revoked_tokens.clear()
        else:
            self._revoked_subjects.clear()
        for item in items:
            self._apply(prefix, item.key, item.value)
        return revision

    def _apply(self, prefix: str, key: str, value: Message | None) -> None:
        """Fold one put (value) or delete (None) of `key` into the in-memory view."""
        name = key[key.find(prefix) + len(prefix):] if prefix in key else key
        if prefix == KEYS_PREFIX:
            self._cache.clear()
            if isinstance(value, identity_pb2.SigningKey):
                self._add_key(value)
            else:
                self._keys.pop(name, None)
        elif prefix == REVOKED_PREFIX:
            if isinstance(value, identity_pb2.RevokedToken):
                self._revoked_tokens[value.token_id] = value.expire_time.ToSeconds() or 0.0
            else:
                self._revoked_tokens.pop(name, None)
        elif isinstance(value, identity_pb2.RevokedSubject):
            revoke_time = value.revoke_time.ToNanoseconds() / 1e9
            self._revoked_subjects[(value.kind, value.id, value.project_id)] = revoke_time
        else:
            kind, _, rest = name.partition("/")
            subject_id, _, project_id = rest.partition("/")
            self._revoked_subjects.pop((kind, subject_id, project_id), None)

    def _add_key(self, key: identity_pb2.SigningKey) -> None:
        try:
            self._keys[key.kid] = ed25519.PublicKey.from_pem(key.public_key_pem)
        except ValueError:
            # Unreadable, or not an Ed25519 key: it verifies nothing.
            log.warning("signing_key.unreadable", kid=key.kid)

    async def _follow(self, prefix: str) -> None:
        """One supervised run: watch `prefix`, re-listing after a compaction and periodically.

        A transient failure (etcd out of reach) goes to the supervisor, which
        backs off and resumes the watch from the last revision; any other
        failure makes the next run start from a listing.
        """
        try:
            while True:
                if prefix in self._must_list:
                    self._revisions[prefix] = await self._load(prefix)
                    self._must_list.discard(prefix)
                if not await self._watch_for_a_while(prefix):
                    self._must_list.add(prefix)
        except self._restart_policy.transient:
            raise
        except Exception:
            self._must_list.add(prefix)
            raise

    async def _watch_for_a_while(self, prefix: str) -> bool:
        """Apply events; False when it is time to list again (backstop period, compaction)."""
        backstop = asyncio.timeout(self._resync_interval)
        try:
            async with backstop:
                async for event in self._store.watch(
                    prefix, self._message_type(prefix),
                    start_revision=self._revisions[prefix] + 1,
                    on_undecodable=self._skip_undecodable,
                ):
                    self._apply(prefix, event.key, event.value)
                    self._revisions[prefix] = event.mod_revision
        except TimeoutError:
            if not backstop.expired():
                raise
            return False  # the periodic backstop: list again
        except errors.FailedPrecondition as exc:
            if exc.reason != COMPACTED:
                raise
            log.info("auth.watch_compacted", prefix=prefix)
            return False
        return True

    def _skip_undecodable(self, key: str, revision: int) -> None:
        self.undecodable += 1
        log.warning("auth.record_undecodable", key=key, mod_revision=revision)

    def add_public_key(self, kid: str, public_key_pem: str) -> None:
        """Trust a key immediately (identity calls this for the key it just created)."""
        self._add_key(identity_pb2.SigningKey(kid=kid, public_key_pem=public_key_pem))
        self._cache.clear()

    def note_revoked(self, token_id: str, expires_at: float) -> None:
        """Record a revocation at once in this process (the watch brings it everywhere)."""
        self._revoked_tokens[token_id] = expires_at

    def verify(self, token: str) -> Principal:
        """The principal a token proves, or Unauthenticated (missing, forged, expired, revoked)."""
        now = time.time()
        cached = self._cache.get(token)
        if cached is None:
            cached = self._verify_signature(token)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[token] = cached
        principal, issued_at = cached
        if principal.expires_at <= now:
            raise _unauthenticated("token expired", "nubis.auth.token_expired")
        self._check_revoked(principal, issued_at)
        return principal

    def _verify_signature(self, token: str) -> tuple[Principal, float]:
        header, head, body, signature = _split(token)
        kid = _check_header(header)
        key = self._keys.get(kid) if kid is not None else None
        if key is None:
            raise _unauthenticated("token signed by an unknown key", "nubis.auth.invalid_token")
        if not key.verify(_segment_bytes(signature), f"{head}.{body}".encode("ascii")):
            raise _invalid()
        claims = _json_segment(body)
        _check_claims(claims, time.time())
        return _principal(claims), float(claims["iat"])

    def _check_revoked(self, principal: Principal, issued_at: float) -> None:
        # A user's tokens go with a user revocation, with a revocation of the
        # user in the token's project (a role taken away there), or with the
        # token's project; a revocation of the user in another project leaves
        # them alone.
        subjects = self._revoked_subjects
        revoked = (
            principal.token_id in self._revoked_tokens
            or issued_at <= subjects.get(("user", principal.user_id, ""), -1.0)
            or issued_at <= subjects.get(("user", principal.user_id, principal.project_id), -1.0)
            or issued_at <= subjects.get(("project", principal.project_id, ""), -1.0)
        )
        if revoked:
            raise _unauthenticated("token revoked", "nubis.auth.token_revoked")


def bearer_token(metadata: Mapping[str, str]) -> str:
    """The token of an ``authorization: Bearer <token>`` header, or Unauthenticated."""
    header = metadata.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("missing bearer token", "nubis.auth.missing_token")
    return token.strip()


class TokenAuthenticator:
    """The server auth hook: verify the bearer token, then apply the service's policy table."""

    def __init__(self, verifier: TokenVerifier, table: policy.PolicyTable) -> None:
        self.verifier = verifier
        self.table = table

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        principal = self.verifier.verify(bearer_token(metadata))
        policy.check(self.table, method, principal)
        return principal


async def start_verifier(
    store: Store, *, resync_interval: float = 30.0
) -> tuple[TokenVerifier, Callable[[], Awaitable[None]]]:
    """A started verifier and the coroutine function that stops it (for ServiceParts.on_stop)."""
    verifier = TokenVerifier(store, resync_interval=resync_interval)
    await verifier.start()
    return verifier, verifier.stop
