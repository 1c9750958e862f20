"""MQTT connection settings shared by every link (no paho import: the in-memory broker's
links and simulations use it too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["HEADER_ALLOWANCE", "MqttConfig", "Will"]

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
#: bytes kept free in ``max_payload`` for fixed header, topic, packet id and v5 properties
HEADER_ALLOWANCE = 1024


@dataclass(frozen=True, kw_only=True)
class Will:
    """The last will: what the broker publishes for us when our connection ends uncleanly (the
    socket drops; the keep-alive expires: mosquitto waits 1.5 keep-alives; a take-over by a
    clean start) and not after a clean DISCONNECT nor a take-over that resumes the session."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int = 1
    retain: bool = True

    def __post_init__(self) -> None:
        if self.qos not in (0, 1, 2) or not self.topic or "#" in self.topic or "+" in self.topic:
            raise ValueError(f"a will needs a plain topic and qos 0-2, got {self.topic!r}")


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    url: str  # mqtt://host:port or mqtts://host:port
    client_id: str  # stable across restarts: the broker keys the persistent session on it
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None  # CA bundle (PEM); None with mqtts:// = system CAs
    tls_cert: Path | None = None  # client certificate (PEM), with tls_key
    tls_key: Path | None = None
    protocol: Literal[5, 311] = 5
    keepalive: int = 30  # s
    session_expiry: int = 3600  # s the broker keeps our session after a disconnect (v5)
    reconnect_min: float = 0.5  # s, first reconnect delay, doubled up to reconnect_max
    reconnect_max: float = 30.0  # s
    clean_start: bool = False  # True discards the broker-side session on every connect
    max_inflight: int = 20  # unacknowledged QoS 1 publishes
    max_queued: int = 1000  # messages in paho's outgoing queue (incl. in flight); 0 = unbounded
    default_max_packet: int = 1 << 20  # bytes, assumed when CONNACK announces no maximum
    # bytes: largest packet we accept, announced as CONNECT MaximumPacketSize (v5 only; 3.1.1
    # has no way to say it). None = no limit (the broker's own, 256 MB for mosquitto).
    max_incoming: int | None = None
    will: Will | None = None  # published by the broker if the connection ends uncleanly

    def __post_init__(self) -> None:
        _parse_url(self.url)
        if not self.client_id:
            raise ValueError("client_id must be non-empty: persistent sessions are keyed on it")
        if self.protocol not in (5, 311):
            raise ValueError(f"protocol must be 5 or 311, got {self.protocol!r}")
        if self.password is not None and self.username is None:
            raise ValueError("password given without username")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if not self.tls and (self.tls_ca or self.tls_cert):
            raise ValueError(f"TLS files given for a plain URL {self.url!r}; use mqtts://")
        if self.keepalive <= 0 or self.session_expiry < 0:
            raise ValueError("keepalive must be > 0 and session_expiry >= 0")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ValueError(
                f"need 0 < reconnect_min <= reconnect_max, got "
                f"{self.reconnect_min}, {self.reconnect_max}"
            )
        if self.max_inflight < 1 or self.max_queued < 0 or self.default_max_packet <= 0:
            raise ValueError("max_inflight >= 1, max_queued >= 0, default_max_packet > 0")
        if self.max_incoming is not None and not 0 < self.max_incoming <= 268_435_455:
            raise ValueError(
                f"max_incoming must be 1..268435455 bytes (paho's limit), got {self.max_incoming}"
            )

    @property
    def host(self) -> str:
        return _parse_url(self.url)[1]

    @property
    def port(self) -> int:
        return _parse_url(self.url)[2]

    @property
    def tls(self) -> bool:
        return _parse_url(self.url)[0] == "mqtts"


def _parse_url(url: str) -> tuple[str, str, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad MQTT URL {url!r}: {exc}") from exc
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"expected mqtt://host:port or mqtts://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"MQTT URL must be scheme://host:port only, got {url!r}")
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]
