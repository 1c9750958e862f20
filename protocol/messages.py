"""Wire messages between agents and coordinators. Pure; every decode failure is a DecodeError.

JSON messages are frozen, keyword-only dataclasses with ``type`` and ``schema_version``.
Chunk replies are a binary frame (``EFC1`` + u16 header length + JSON header + data) so a
256 KiB chunk is not base64-inflated. Correlation ids and reply topics travel in the payload,
so the protocol also works on MQTT 3.1.1 brokers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from . import _fields as F
from .canonical import b64d, b64e, canonical_json, decode_json_object
from .envelope import Envelope
from .errors import DecodeError, TooLargeError
from .keyring import MAX_KEYRING, MAX_SIGNATURE
from .manifest import MAX_MANIFEST

__all__ = ["ChunkReply", "ChunkRequest", "DeviceStatus", "ReleaseOffer", "Telemetry"]

MAX_OFFER = 2 * MAX_MANIFEST  # bytes, checked before parsing
MAX_REQUEST = 4096
MAX_STATUS = 16 * 1024
MAX_TELEMETRY = 64 * 1024
MAX_INDEXES = 16  # per request; agents ask for one at a time within their window
_FRAME = b"EFC1"
_HLEN = struct.Struct(">H")


@dataclass(frozen=True, kw_only=True)
class ReleaseOffer:
    """A device's release: the signed parts as raw bytes, and its own key envelope."""

    keyring: bytes
    keyring_sig: bytes
    manifest: bytes
    signature: bytes
    envelope: Envelope
    type: str = "release"
    schema_version: int = 1

    def encode(self) -> bytes:
        return canonical_json(
            {
                "type": self.type,
                "schema_version": self.schema_version,
                "keyring": b64e(self.keyring),
                "keyring_sig": b64e(self.keyring_sig),
                "manifest": b64e(self.manifest),
                "signature": b64e(self.signature),
                "envelope": self.envelope.to_dict(),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ReleaseOffer:
        d = decode_json_object(data, max_size=MAX_OFFER, what="release offer")
        F.check_header(d, "release", 1, "release offer")
        F.check_keys(
            d,
            {
                "type",
                "schema_version",
                "keyring",
                "keyring_sig",
                "manifest",
                "signature",
                "envelope",
            },
            "release offer",
        )
        return cls(
            keyring=b64d(d.get("keyring"), what="offer.keyring", max_len=MAX_KEYRING),
            keyring_sig=b64d(d.get("keyring_sig"), what="offer.keyring_sig", max_len=MAX_SIGNATURE),
            manifest=b64d(d.get("manifest"), what="offer.manifest", max_len=MAX_MANIFEST),
            signature=b64d(d.get("signature"), what="offer.signature", max_len=MAX_SIGNATURE),
            envelope=Envelope.from_dict(d.get("envelope")),
        )


@dataclass(frozen=True, kw_only=True)
class ChunkRequest:
    bundle_id: str
    indexes: tuple[int, ...]
    reply_to: str
    corr: str
    type: str = "chunkreq"
    schema_version: int = 1

    def __post_init__(self) -> None:
        if not 0 < len(self.indexes) <= MAX_INDEXES or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.indexes
        ):
            raise DecodeError(f"chunk request: expected 1..{MAX_INDEXES} non-negative indexes")
        if len(set(self.indexes)) != len(self.indexes):
            raise DecodeError("chunk request: duplicate indexes")
        if len(self.corr) > 64 or len(self.reply_to) > 256 or len(self.bundle_id) != 32:
            raise DecodeError("chunk request: corr <= 64, reply_to <= 256, bundle_id 32 chars")

    def encode(self) -> bytes:
        return canonical_json(
            {
                "type": self.type,
                "schema_version": self.schema_version,
                "bundle_id": self.bundle_id,
                "indexes": list(self.indexes),
                "reply_to": self.reply_to,
                "corr": self.corr,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> ChunkRequest:
        w = "chunk request"
        d = decode_json_object(data, max_size=MAX_REQUEST, what=w)
        F.check_header(d, "chunkreq", 1, w)
        F.check_keys(d, {"type", "schema_version", "bundle_id", "indexes", "reply_to", "corr"}, w)
        return cls(
            bundle_id=F.field(d, "bundle_id", str, w),
            indexes=tuple(F.field(d, "indexes", list, w)),
            reply_to=F.field(d, "reply_to", str, w),
            corr=F.field(d, "corr", str, w),
        )


@dataclass(frozen=True, kw_only=True)
class ChunkReply:
    bundle_id: str
    index: int
    corr: str
    data: bytes = b""
    status: str = "ok"  # "ok" | "refused" | "unknown"
    reason: str = ""

    def encode(self) -> bytes:
        head = canonical_json(
            {
                "bundle_id": self.bundle_id,
                "index": self.index,
                "corr": self.corr,
                "status": self.status,
                "reason": self.reason[:200],
            }
        )
        return _FRAME + _HLEN.pack(len(head)) + head + self.data

    @classmethod
    def decode(cls, frame: bytes, *, max_data: int) -> ChunkReply:
        if len(frame) < 6 or frame[:4] != _FRAME:
            raise DecodeError(f"chunk reply: expected frame magic {_FRAME!r}")
        (hlen,) = _HLEN.unpack_from(frame, 4)
        if hlen > 1024 or 6 + hlen > len(frame):
            raise DecodeError(f"chunk reply: bad header length {hlen}")
        if len(frame) - 6 - hlen > max_data:
            raise TooLargeError(
                f"chunk reply: expected at most {max_data} data bytes, saw {len(frame) - 6 - hlen}"
            )
        w = "chunk reply"
        d = decode_json_object(frame[6 : 6 + hlen], max_size=1024, what=w)
        F.check_keys(d, {"bundle_id", "index", "corr", "status", "reason"}, w)
        status = F.field(d, "status", str, w)
        if status not in ("ok", "refused", "unknown"):
            raise DecodeError(f"chunk reply: unknown status {status!r:.20}")
        return cls(
            bundle_id=F.field(d, "bundle_id", str, w),
            index=F.field(d, "index", int, w),
            corr=F.field(d, "corr", str, w),
            status=status,
            reason=F.field(d, "reason", str, w),
            data=bytes(frame[6 + hlen :]),
        )


_U63 = (1 << 63) - 1


def _u63(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U63:
        raise DecodeError(f"{what}: expected an integer in 0..2^63-1, saw {v!r:.40}")
    return v


def _text(limit: int) -> Any:
    def check(v: object, what: str) -> str:
        if not isinstance(v, str):
            raise DecodeError(f"{what}: expected a string, saw {type(v).__name__}")
        return v[:limit]  # untrusted free text is cut, not refused

    return check


def _bool(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise DecodeError(f"{what}: expected true or false, saw {v!r:.20}")
    return v


_ACTIVE = {
    "name": F.name,
    "version": F.name,
    "sequence": _u63,
    "format": _text(16),
    "bundle_id": _text(64),
}
_RESULT = {
    "ok": _bool,
    "code": _text(32),
    "reason": _text(500),
    "sequence": _u63,
    "name": F.name,
    "model_version": F.name,
    "bundle_id": _text(64),
    "time": _u63,
}
_PROGRESS = {
    k: _u63 for k in ("sequence", "done", "total", "reused", "fetched", "requests", "rejected")
} | {"bundle_id": _text(64)}


def _typed(obj: object, schema: dict[str, Any], what: str) -> dict[str, Any] | None:
    """Validate the known fields of an untrusted object; unknown fields are dropped."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise DecodeError(f"{what}: expected an object or null")
    return {
        k: check(obj[k], f"{what}.{k}") for k, check in schema.items() if obj.get(k) is not None
    }


@dataclass(frozen=True, kw_only=True)
class DeviceStatus:
    """What an agent reports: retained on its status topic, refreshed as a heartbeat."""

    device_id: str
    time: int  # unix seconds
    state: str  # "idle" | "downloading" | "installing" | "error"
    active: dict[str, Any] | None = None  # name, version, sequence, format, bundle_id
    highest_sequence: int = 0
    last_result: dict[str, Any] | None = None  # ok, code, reason, sequence
    progress: dict[str, Any] | None = None  # bundle_id, sequence, done, total (bytes)
    counter: int = 0  # increases with every report from one agent process
    type: str = "status"
    schema_version: int = 1

    STATES = ("idle", "downloading", "installing", "error", "offline")

    def __post_init__(self) -> None:
        F.name(self.device_id, "status.device_id")
        if self.state not in self.STATES:
            raise DecodeError(
                f"status.state: expected one of {self.STATES}, saw {self.state!r:.20}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "schema_version": self.schema_version,
            "device_id": self.device_id,
            "time": self.time,
            "state": self.state,
            "active": self.active,
            "highest_sequence": self.highest_sequence,
            "last_result": self.last_result,
            "progress": self.progress,
            "counter": self.counter,
        }

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> DeviceStatus:
        w = "status"
        d = decode_json_object(data, max_size=MAX_STATUS, what=w)
        F.check_header(d, "status", 1, w)
        F.check_keys(d, set(cls(device_id="x", time=0, state="idle").to_dict()), w)
        return cls(
            device_id=F.field(d, "device_id", str, w),
            time=_u63(d.get("time"), "status.time"),
            state=F.field(d, "state", str, w),
            highest_sequence=_u63(d.get("highest_sequence"), "status.highest_sequence"),
            counter=_u63(d.get("counter"), "status.counter"),
            active=_typed(d.get("active"), _ACTIVE, "status.active"),
            last_result=_typed(d.get("last_result"), _RESULT, "status.last_result"),
            progress=_typed(d.get("progress"), _PROGRESS, "status.progress"),
        )


@dataclass(frozen=True, kw_only=True)
class Telemetry:
    device_id: str
    time: int
    metrics: dict[str, Any] = field(default_factory=dict)
    type: str = "telemetry"
    schema_version: int = 1

    def encode(self) -> bytes:
        return canonical_json(
            {
                "type": self.type,
                "schema_version": self.schema_version,
                "device_id": self.device_id,
                "time": self.time,
                "metrics": self.metrics,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Telemetry:
        w = "telemetry"
        d = decode_json_object(data, max_size=MAX_TELEMETRY, what=w)
        F.check_header(d, "telemetry", 1, w)
        return cls(
            device_id=F.name(d.get("device_id"), "telemetry.device_id"),
            time=F.field(d, "time", int, w),
            metrics=F.field(d, "metrics", dict, w),
        )
