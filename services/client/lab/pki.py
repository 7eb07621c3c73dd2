"""The certificates of a `nubis lab up --tls` lab: a lab CA, one certificate per process kind.

Everything lives under `<state-dir>/tls/`: the CA (`ca.pem`, `ca.key`), one
certificate per control service and one for the agents (each good for serving
and for dialing other services, since services call each other with mutual
TLS), and `client.pem` for the CLI and the lab's own probes. Server
certificates name 127.0.0.1, localhost, the lab's advertised host and this
machine's host name, so every address the catalog publishes verifies. Keys are
written mode 0600; made once and kept across restarts (`down --purge` removes
them), so a running part and a restarted one trust the same CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR = "tls"
CA_NAME = "ca"
CLIENT_NAME = "client"
# Long enough that a lab left running never needs new certificates.
_VALID_DAYS = 825


@dataclass(frozen=True)
class CertPaths:
    """The PEM certificate and private key of one process kind."""

    cert: Path
    key: Path


def tls_dir(state_dir: Path) -> Path:
    return state_dir / TLS_DIR


def paths(state_dir: Path, name: str) -> CertPaths:
    """Where the certificate and key called `name` ("ca", "identity", "client") live."""
    base = tls_dir(state_dir)
    return CertPaths(base / f"{name}.pem", base / f"{name}.key")


def ca_file(state_dir: Path) -> Path:
    return paths(state_dir, CA_NAME).cert


def server_names(host: str) -> list[x509.GeneralName]:
    """The SANs of a lab server: loopback, localhost, the advertised host, this machine's name."""
    names: list[x509.GeneralName] = []
    for entry in dict.fromkeys(["127.0.0.1", "::1", "localhost", host, socket.gethostname()]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(entry)))
        except ValueError:
            names.append(x509.DNSName(entry))
    return names


def ensure(state_dir: Path, host: str, servers: list[str]) -> None:
    """Make the CA, a certificate for each of `servers` and the client's, unless they exist."""
    directory = tls_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = paths(state_dir, CA_NAME)
    if not (ca.cert.is_file() and ca.key.is_file()):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(ca, _ca_certificate(key), key)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    for name in [*servers, CLIENT_NAME]:
        target = paths(state_dir, name)
        if target.cert.is_file() and target.key.is_file():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [] if name == CLIENT_NAME else server_names(host)
        _write(target, _leaf(f"nubis-{name}", key, ca_cert, ca_key, sans), key)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nubis lab"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name("nubis lab CA")).issuer_name(_name("nubis lab CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )


def _leaf(common_name: str, key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          ca_key: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if sans:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _write(target: CertPaths, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    descriptor = os.open(target.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    target.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
