"""TLS and mutual TLS between make_channel and the server bootstrap, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.client.channel import CallPolicy, make_channel
from services.common import server
from services.common.settings import ServiceEndpoint, Settings, TlsSettings
from tests.functional import echo_service
from tests.gen.testing.v1 import echo_pb2, echo_pb2_grpc

NO_RETRY = CallPolicy(max_attempts=1, timeout=5)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    server_name: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server_name:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("nubis test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    issuer = (ca.subject, ca_key)
    server_cert = _issue("echo", server_key, issuer, server_name=True)
    client_cert = _issue("client", client_key, issuer)
    _write(base / "ca.pem", ca, ca_key)
    _write(base / "server.pem", server_cert, server_key)
    _write(base / "client.pem", client_cert, client_key)
    return Pki(
        base / "ca.pem", base / "server.pem", base / "server.key",
        base / "client.pem", base / "client.key",
    )


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[server.RunningServer]:
    tls = TlsSettings(
        enabled=True,
        cert_file=str(pki.server_cert),
        key_file=str(pki.server_key),
        ca_file=str(pki.ca),
        require_client_cert=True,
    )
    running = await server.start(
        ServiceEndpoint(host="127.0.0.1", port=0),
        [echo_service.registration()],
        settings=Settings(tls=tls),
    )
    yield running
    await running.stop(0)


async def _echo(address: str, tls: TlsSettings | None) -> str:
    async with make_channel(address, settings=tls, policy=NO_RETRY) as channel:
        stub = echo_pb2_grpc.EchoServiceStub(channel)
        return (await stub.Echo(echo_pb2.EchoRequest(message="over tls"))).message


async def test_client_with_a_certificate_of_the_ca_is_served(
    mtls_server: server.RunningServer, pki: Pki
) -> None:
    tls = TlsSettings(
        enabled=True, ca_file=str(pki.ca), cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    assert await _echo(mtls_server.address, tls) == "over tls"


@pytest.mark.parametrize("client", ["no client certificate", "plaintext"])
async def test_client_without_certificate_is_refused(
    mtls_server: server.RunningServer, pki: Pki, client: str
) -> None:
    tls = TlsSettings(enabled=True, ca_file=str(pki.ca)) if client != "plaintext" else None
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _echo(mtls_server.address, tls)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_enabled_without_key_fails_at_start() -> None:
    with pytest.raises(ValueError, match=r"tls\.key_file"):
        await server.start(
            ServiceEndpoint(host="127.0.0.1", port=0),
            [echo_service.registration()],
            settings=Settings(tls=TlsSettings(enabled=True)),
        )
