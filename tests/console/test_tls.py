"""The API over HTTPS with client certificates required (mTLS), as ``console serve`` runs it.

A CA, a server certificate for 127.0.0.1 and a client certificate are made with
``cryptography``; the API runs on uvicorn with them. A client with the certificate and a token
gets in; one without a certificate is refused in the TLS handshake; the token still decides.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from edgefleet.coordinator import access
from edgefleet.coordinator.home import Coordinator

from edgefleet._cli_console import Tls, start_api, stop_api
from tests.integration.fleet import wait_until

from .test_dashboard import free_port

Key = ec.EllipticCurvePrivateKey


def _cert(subject: str, key: Key, issuer: tuple[str, Key] | None = None, *, ca: bool = False,
          ip: str | None = None) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (subject, key) if issuer is None else issuer
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(hours=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
        critical=False)  # fmt: skip
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)  # fmt: skip
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                            critical=False)  # fmt: skip
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: Key | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))  # fmt: skip
    return path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("edgefleet-test-ca", ca_key, ca=True)
    return {
        "ca": _write(tmp_path / "ca.pem", ca),
        "server": _write(tmp_path / "server.pem",
                         _cert("api", srv_key, ("edgefleet-test-ca", ca_key), ip="127.0.0.1"),
                         srv_key),  # fmt: skip
        "client": _write(tmp_path / "client.pem",
                         _cert("alice", cli_key, ("edgefleet-test-ca", ca_key)), cli_key),
    }  # fmt: skip


@pytest.fixture
def api(tmp_path: Path, pki: dict[str, Path]) -> Iterator[tuple[str, str]]:
    c = Coordinator.init(tmp_path / "coordinator")
    token = access.create_token(c.registry, name="alice", role="viewer", by="test")
    port = free_port()
    tls = Tls(pki["server"], pki["server"].with_suffix(".key"), pki["ca"])
    handle = start_api(c, f"127.0.0.1:{port}", tls)
    try:
        wait_until(lambda: handle.server.started, "uvicorn with TLS to start")
        yield f"https://127.0.0.1:{port}", token
    finally:
        stop_api(handle)
        c.registry.engine.dispose()


def test_mtls_admits_a_client_certificate_and_refuses_none(api: tuple[str, str],
                                                           pki: dict[str, Path]) -> None:
    url, token = api
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client"]), str(pki["client"].with_suffix(".key")))
    with httpx.Client(verify=with_cert, timeout=10) as ok:
        assert ok.get(f"{url}/healthz").status_code == 200
        me = ok.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["role"] == "viewer"
        assert ok.get(f"{url}/api/v1/me").status_code == 401  # the certificate is not a token
    without = ssl.create_default_context(cafile=str(pki["ca"]))
    with httpx.Client(verify=without, timeout=10) as anonymous, \
            pytest.raises(httpx.TransportError):  # fmt: skip
        anonymous.get(f"{url}/healthz")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tls_cert": "c.pem"}, "--tls-cert and --tls-key go together"),
        ({"client_ca": "ca.pem"}, "--tls-cert and --tls-key go together"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "no such file"),
    ],
)
def test_tls_options_are_checked_in_one_line(given: dict[str, str], message: str) -> None:
    args = argparse.Namespace(**{"tls_cert": None, "tls_key": None, "client_ca": None, **given})
    with pytest.raises(ValueError, match=message):
        Tls.from_args(args)
    assert Tls.from_args(argparse.Namespace(tls_cert=None, tls_key=None, client_ca=None)) is None
