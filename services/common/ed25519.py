"""Ed25519 signature checks through the OpenSSL libcrypto the interpreter has already loaded.

A service that only verifies identity's tokens needs one primitive, Ed25519
verification (RFC 8032), which the standard library does not offer. The
`cryptography` package offers it, but brings its own statically linked OpenSSL
and its Python layers, some 13 MiB resident in every process. Python's `ssl` and
`hashlib` modules link the system's libcrypto, already mapped in every service
(asyncio imports `ssl`), and it has the same primitive: `EVP_DigestVerify` on an
`EVP_PKEY_ED25519` key, which is what `cryptography` itself calls in its own copy.
So the check here is OpenSSL's, reached through ctypes. Where that libcrypto
cannot be found or lacks Ed25519 (OpenSSL before 1.1.1), `PublicKey` uses
`cryptography` instead: the same check, only the memory differs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import functools
from pathlib import Path
from typing import Any, Protocol

# NID_ED25519, also EVP_PKEY_ED25519 (OpenSSL's obj_mac.h; fixed since 1.1.1).
_EVP_PKEY_ED25519 = 1087
# The only DER form of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4): SEQUENCE {
# SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) of the 32-byte key }.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"


class _Verify(Protocol):
    def __call__(self, signature: bytes, message: bytes) -> bool: ...


def raw_public_key(pem: str) -> bytes:
    """The 32 key bytes of a PEM Ed25519 public key (SubjectPublicKeyInfo), or ValueError."""
    text = pem.strip()
    if not (text.startswith(_PEM_BEGIN) and text.endswith(_PEM_END)):
        raise ValueError("not a PEM public key")
    body = "".join(text[len(_PEM_BEGIN):-len(_PEM_END)].split())
    try:
        der = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise ValueError("not a PEM public key") from None
    if len(der) != len(_SPKI_PREFIX) + PUBLIC_KEY_BYTES or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 public key")
    return der[len(_SPKI_PREFIX):]


class _LibCrypto:
    """The few EVP functions an Ed25519 check needs, typed for ctypes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        self.new_key = self._bind(library.EVP_PKEY_new_raw_public_key, p,
                                  [i, p, ctypes.c_char_p, size])
        self.free_key = self._bind(library.EVP_PKEY_free, None, [p])
        self.new_ctx = self._bind(library.EVP_MD_CTX_new, p, [])
        self.free_ctx = self._bind(library.EVP_MD_CTX_free, None, [p])
        self.verify_init = self._bind(library.EVP_DigestVerifyInit, i, [p, p, p, p, p])
        self.verify = self._bind(library.EVP_DigestVerify, i,
                                 [p, ctypes.c_char_p, size, ctypes.c_char_p, size])
        # A failed check leaves entries on the thread's OpenSSL error queue, which the
        # ssl module could later mistake for its own: they are cleared after each check.
        self.clear_errors = self._bind(library.ERR_clear_error, None, [])

    @staticmethod
    def _bind(function: Any, restype: Any, argtypes: list[Any]) -> Any:
        function.restype = restype
        function.argtypes = argtypes
        return function


def _loaded_libcrypto() -> Path | None:
    """The libcrypto file this process has mapped (for `ssl`/`hashlib`), if any."""
    with contextlib.suppress(ImportError):  # a Python built without OpenSSL has none
        import _hashlib  # noqa: F401  (links libcrypto, so importing it maps the library)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and Path(fields[5]).name.startswith("libcrypto.so"):
                return Path(fields[5])
    return None


@functools.cache
def _openssl() -> _LibCrypto | None:
    """The bound libcrypto, found once; None where it is missing or has no Ed25519."""
    path = _loaded_libcrypto()
    with contextlib.suppress(OSError, AttributeError):
        return _LibCrypto(ctypes.CDLL(str(path) if path else "libcrypto.so.3"))
    return None


class PublicKey:
    """An Ed25519 public key that checks signatures (OpenSSL's check; see the module doc)."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.raw = bytes(raw)
        self._openssl = _openssl()
        self._key: int | None = None
        self._fallback: _Verify | None = None
        if self._openssl is None:
            self._fallback = _cryptography_check(self.raw)
            return
        self._key = self._openssl.new_key(_EVP_PKEY_ED25519, None, self.raw, len(self.raw))
        if not self._key:
            self._openssl.clear_errors()
            raise ValueError("OpenSSL refused the Ed25519 public key")

    @classmethod
    def from_pem(cls, pem: str) -> PublicKey:
        return cls(raw_public_key(pem))

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature of `message`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        if self._fallback is not None:
            return self._fallback(signature, message)
        openssl = self._openssl
        assert openssl is not None and self._key
        ctx = openssl.new_ctx()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            # No digest for Ed25519: the scheme hashes the message itself (PureEdDSA).
            if openssl.verify_init(ctx, None, None, None, self._key) != 1:
                raise ValueError("EVP_DigestVerifyInit refused the Ed25519 key")
            return bool(openssl.verify(ctx, signature, len(signature), message,
                                       len(message)) == 1)
        finally:
            openssl.free_ctx(ctx)
            openssl.clear_errors()

    def __del__(self) -> None:
        # A ctypes pointer does not free what it points to.
        if getattr(self, "_key", None) and self._openssl is not None:
            self._openssl.free_key(self._key)
            self._key = None


def _cryptography_check(raw: bytes) -> _Verify:
    """The same check through `cryptography`, where no usable libcrypto is loaded."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(raw)

    def check(signature: bytes, message: bytes) -> bool:
        try:
            public.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    return check
