"""Shared helpers for the integration tests: message inboxes, link factories, TLS material."""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.infra.broker import EmbeddedBroker, TlsFiles, _which
from edgefleet.infra.link.mqtt import MessageProps, MqttConfig, MqttLink

TIMEOUT = 10.0  # s, generous upper bound for any single wait; passing tests never reach it
HAVE_MOSQUITTO = _which("mosquitto") is not None
NEED_MOSQUITTO = "needs the mosquitto binary (amqtt has no ACLs, no v5, no persistence)"


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    props: MessageProps


class Inbox:
    """Thread-safe message sink with waits on a condition (no sleeping)."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self.messages: list[Received] = []
        self._cond = cond or threading.Condition()  # share one to wait across inboxes

    def __call__(self, topic: str, payload: bytes, props: MessageProps) -> None:
        with self._cond:
            self.messages.append(Received(topic, payload, props))
            self._cond.notify_all()

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float = TIMEOUT
    ) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def wait_topic(self, topic: str, timeout: float = TIMEOUT) -> Received:
        assert self.wait_for(lambda ms: any(m.topic == topic for m in ms), timeout), (
            f"no message on {topic} within {timeout} s; got {self.topics()}"
        )
        return next(m for m in self.messages if m.topic == topic)

    def topics(self) -> list[str]:
        with self._cond:
            return [m.topic for m in self.messages]


@dataclass
class Events:
    """Connect/disconnect callbacks recorded as events."""

    connects: list[bool] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def on_connect(self, session_present: bool) -> None:
        with self._cond:
            self.connects.append(session_present)
            self._cond.notify_all()

    def on_disconnect(self, reason: str) -> None:
        with self._cond:
            self.disconnects.append(reason)
            self._cond.notify_all()

    def wait_connects(self, n: int, timeout: float = TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.connects) >= n, timeout)

    def wait_disconnects(self, n: int, timeout: float = TIMEOUT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.disconnects) >= n, timeout)


@dataclass
class Client:
    link: MqttLink
    inbox: Inbox
    events: Events


class LinkFactory:
    """Builds MqttLinks against a broker and stops them all at teardown."""

    def __init__(self) -> None:
        self._links: list[MqttLink] = []

    def make(
        self,
        broker: EmbeddedBroker,
        client_id: str,
        *,
        subscribe: tuple[str, ...] = (),
        start: bool = True,
        wait: bool = True,
        inbox: Inbox | None = None,
        **config: Any,
    ) -> Client:
        config.setdefault("protocol", broker.protocol)
        config.setdefault("reconnect_min", 0.2)
        config.setdefault("reconnect_max", 1.0)
        inbox, events = inbox or Inbox(), Events()
        link = MqttLink(
            MqttConfig(url=broker.url, client_id=client_id, **config),
            inbox,
            on_connect=events.on_connect,
            on_disconnect=events.on_disconnect,
        )
        for topic in subscribe:
            link.subscribe(topic)
        self._links.append(link)
        if start:
            link.start()
            if wait:
                assert link.wait_connected(TIMEOUT), f"{client_id}: {link.last_error}"
        return Client(link, inbox, events)

    def close(self) -> None:
        """Stop every link; call it before stopping a broker to spare paho's reconnect wait."""
        while self._links:
            self._links.pop().stop()


@dataclass(frozen=True)
class SecureBroker:
    broker: EmbeddedBroker
    passwords: dict[str, str]


@dataclass(frozen=True)
class TlsMaterial:
    server: TlsFiles
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TlsMaterial:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert (EC P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def issue(
        name: str, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False, server: bool = False
    ) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        elif not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256()), key

    def write(stem: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    ca_cert, ca_key = issue("edgefleet-test-ca", None, ca=True)
    ca_path, _ = write("ca", ca_cert, ca_key)
    srv_path, srv_key = write("server", *issue("localhost", (ca_cert.subject, ca_key), server=True))
    cli_path, cli_key = write("client", *issue("dev-a", (ca_cert.subject, ca_key)))
    return TlsMaterial(
        TlsFiles(ca=ca_path, cert=srv_path, key=srv_key, require_client_cert=True),
        cli_path,
        cli_key,
    )
