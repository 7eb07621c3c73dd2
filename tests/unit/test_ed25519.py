"""services.common.ed25519: OpenSSL's Ed25519 check through ctypes agrees with `cryptography`."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519 as crypto_ed25519

from services.common import ed25519

MESSAGE = b"header.payload"


def _pem(public: object) -> str:
    assert isinstance(public, (crypto_ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey))
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_the_loaded_libcrypto_checks_signatures() -> None:
    # Where this fails, services still verify tokens, through `cryptography` (more memory).
    assert ed25519._openssl() is not None


def test_signatures_check_as_cryptography_checks_them() -> None:
    private = crypto_ed25519.Ed25519PrivateKey.generate()
    key = ed25519.PublicKey.from_pem(_pem(private.public_key()))
    fallback = ed25519._cryptography_check(key.raw)
    good = private.sign(MESSAGE)
    # S + L: the same signature with a non-canonical scalar, which RFC 8032 refuses.
    order = 2**252 + 27742317777372353535851937790883648493
    scalar = int.from_bytes(good[32:], "little") + order
    cases = {
        "good": (good, MESSAGE, True),
        "other message": (good, MESSAGE + b"x", False),
        "flipped bit": (good[:-1] + bytes([good[-1] ^ 1]), MESSAGE, False),
        "zeros": (bytes(64), MESSAGE, False),
        "non-canonical": (good[:32] + scalar.to_bytes(32, "little"), MESSAGE, False),
        "other key's": (crypto_ed25519.Ed25519PrivateKey.generate().sign(MESSAGE), MESSAGE,
                        False),
    }
    for name, (signature, message, expected) in cases.items():
        assert key.verify(signature, message) is expected, name
        assert fallback(signature, message) is expected, name
    assert key.verify(good[:63], MESSAGE) is False


@pytest.mark.parametrize("case", ["ec-key", "not-pem", "bad-base64", "truncated"])
def test_only_ed25519_public_keys_are_read(case: str) -> None:
    pem = _pem(crypto_ed25519.Ed25519PrivateKey.generate().public_key())
    lines = pem.splitlines()
    texts = {
        "ec-key": _pem(ec.generate_private_key(ec.SECP256R1()).public_key()),
        "not-pem": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA",
        "bad-base64": "\n".join([lines[0], lines[1][:-2] + "!!", *lines[2:]]),
        "truncated": "\n".join([lines[0], lines[1][:40], *lines[2:]]),
    }
    with pytest.raises(ValueError):
        ed25519.PublicKey.from_pem(texts[case])
