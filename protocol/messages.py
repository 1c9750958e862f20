"""Wire messages between agents and coordinators. Pure; every decode failure is a DecodeError.

JSON messages are frozen, keyword-only dataclasses with ``type`` and ``schema_version``.
Chunk replies are a binary frame (``EFC1`` + u16 header length + JSON header + data) so a
256 KiB chunk is not base64-inflated. Correlation ids and reply topics travel in the payload,
so the protocol also works on MQTT 3.1.1 brokers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from . import _fields as F
from .candidate import CANDIDATE_MODES
from .canonical import b64d, b64e, canonical_json, decode_json_object
from .envelope import Envelope
from .errors import DecodeError, TooLargeError
from .keyring import MAX_KEYRING, MAX_SIGNATURE
from .manifest import MAX_MANIFEST

__all__ = [
    "ActiveModel",
    "CandidateModel",
    "ChunkReply",
    "ChunkRequest",
    "DeviceStatus",
    "DownloadProgress",
    "InstallResult",
    "ReleaseOffer",
    "Telemetry",
]
_T = TypeVar("_T")

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


def _opt(check: Any) -> Any:
    def opt(v: object, what: str) -> Any:
        return None if v is None else check(v, what)

    return opt


def _typed(cls: type[_T], obj: object, schema: dict[str, Any], what: str) -> _T | None:
    """Validate the known fields of an untrusted object into ``cls``; unknown fields are
    dropped (newer agents may report more), missing required ones are refused."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise DecodeError(f"{what}: expected an object or null")
    values = {k: check(obj.get(k), f"{what}.{k}") for k, check in schema.items() if k in obj}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise DecodeError(f"{what}: expected fields {sorted(schema)}, saw {sorted(obj)}") from exc


def _plain(obj: Any) -> dict[str, Any] | None:
    return None if obj is None else dataclasses.asdict(obj)


@dataclass(frozen=True, kw_only=True)
class ActiveModel:
    """The version a device serves."""

    name: str
    version: str
    sequence: int
    format: str
    bundle_id: str

    SCHEMA: ClassVar[dict[str, Any]] = {
        "name": F.name,
        "version": F.name,
        "sequence": _u63,
        "format": _text(16),
        "bundle_id": _text(64),
    }


def _mode(v: object, what: str) -> str:
    if v not in CANDIDATE_MODES:
        raise DecodeError(f"{what}: expected one of {CANDIDATE_MODES}, saw {v!r:.20}")
    return str(v)


@dataclass(frozen=True, kw_only=True)
class CandidateModel:
    """The shadow / A/B candidate a device serves beside its active model (``agent.candidate``)."""

    name: str
    version: str
    sequence: int
    bundle_id: str
    mode: str  # protocol.candidate.CANDIDATE_MODES

    SCHEMA: ClassVar[dict[str, Any]] = {
        "name": F.name,
        "version": F.name,
        "sequence": _u63,
        "bundle_id": _text(64),
        "mode": _mode,
    }

    def __post_init__(self) -> None:
        _mode(self.mode, "status.candidate.mode")


@dataclass(frozen=True, kw_only=True)
class InstallResult:
    """The outcome of the last install, rollback or refused offer on a device."""

    ok: bool
    code: str  # "ok", "rollback", or the BundleError/StoreError code
    reason: str = ""
    time: int = 0  # unix seconds
    sequence: int | None = None
    name: str | None = None
    model_version: str | None = None
    bundle_id: str | None = None

    SCHEMA: ClassVar[dict[str, Any]] = {
        "ok": _bool,
        "code": _text(32),
        "reason": _opt(_text(500)),
        "time": _opt(_u63),
        "sequence": _opt(_u63),
        "name": _opt(F.name),
        "model_version": _opt(F.name),
        "bundle_id": _opt(_text(64)),
    }

    def __post_init__(self) -> None:  # decoded text may be cut; absent optional text is ""
        if self.reason is None:
            object.__setattr__(self, "reason", "")
        if self.time is None:
            object.__setattr__(self, "time", 0)


@dataclass(frozen=True, kw_only=True)
class DownloadProgress:
    """A download under way: bytes done of total, and how the chunks were obtained."""

    bundle_id: str
    sequence: int
    done: int  # bytes
    total: int  # bytes
    reused: int = 0  # chunks found valid on disk after a restart
    fetched: int = 0
    requests: int = 0
    rejected: int = 0

    SCHEMA: ClassVar[dict[str, Any]] = {
        k: _u63 for k in ("sequence", "done", "total", "reused", "fetched", "requests", "rejected")
    } | {"bundle_id": _text(64)}


@dataclass(frozen=True, kw_only=True)
class DeviceStatus:
    """What an agent reports: retained on its status topic, refreshed as a heartbeat."""

    device_id: str
    time: int  # unix seconds
    state: str  # "idle" | "downloading" | "installing" | "error"
    active: ActiveModel | None = None
    highest_sequence: int = 0
    last_result: InstallResult | None = None
    progress: DownloadProgress | None = None
    counter: int = 0  # increases with every report from one agent process
    # what the device takes part in beyond releases, e.g. ("fl",): opted in to federated
    # rounds. Sent only when non-empty (a status without it decodes as ()), sorted, unique.
    capabilities: tuple[str, ...] = ()
    # the shadow / A/B candidate it serves; sent only when there is one (absent decodes None)
    candidate: CandidateModel | None = None
    type: str = "status"
    schema_version: int = 1

    STATES = ("idle", "downloading", "installing", "error", "offline")
    FL = "fl"  # the capability of a device that opted in to federated learning
    MAX_CAPABILITIES = 16

    def __post_init__(self) -> None:
        F.name(self.device_id, "status.device_id")
        if self.state not in self.STATES:
            raise DecodeError(
                f"status.state: expected one of {self.STATES}, saw {self.state!r:.20}"
            )
        _check_capabilities(self.capabilities, self.MAX_CAPABILITIES)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "type": self.type,
            "schema_version": self.schema_version,
            "device_id": self.device_id,
            "time": self.time,
            "state": self.state,
            "active": _plain(self.active),
            "highest_sequence": self.highest_sequence,
            "last_result": _plain(self.last_result),
            "progress": _plain(self.progress),
            "counter": self.counter,
        }
        if self.capabilities:  # the optional fields: only when set
            d["capabilities"] = sorted(self.capabilities)
        if self.candidate is not None:
            d["candidate"] = _plain(self.candidate)
        return d

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> DeviceStatus:
        w = "status"
        d = decode_json_object(data, max_size=MAX_STATUS, what=w)
        F.check_header(d, "status", 1, w)
        F.check_keys(d, _status_keys(), w)
        caps = d.get("capabilities", [])
        if not isinstance(caps, list):
            raise DecodeError(f"status.capabilities: expected a list, saw {type(caps).__name__}")
        return cls(
            device_id=F.field(d, "device_id", str, w),
            time=_u63(d.get("time"), "status.time"),
            state=F.field(d, "state", str, w),
            highest_sequence=_u63(d.get("highest_sequence"), "status.highest_sequence"),
            counter=_u63(d.get("counter"), "status.counter"),
            active=_typed(ActiveModel, d.get("active"), ActiveModel.SCHEMA, "status.active"),
            last_result=_typed(
                InstallResult, d.get("last_result"), InstallResult.SCHEMA, "status.last_result"
            ),
            progress=_typed(
                DownloadProgress, d.get("progress"), DownloadProgress.SCHEMA, "status.progress"
            ),
            capabilities=tuple(caps),
            candidate=_typed(
                CandidateModel, d.get("candidate"), CandidateModel.SCHEMA, "status.candidate"
            ),
        )


@functools.cache
def _status_keys() -> frozenset[str]:
    """The keys a status may have: what ``to_dict`` writes, and the optional ones."""
    every = DeviceStatus(device_id="x", time=0, state="idle").to_dict()
    return frozenset({*every, "capabilities", "candidate"})


def _check_capabilities(caps: object, limit: int) -> None:
    """A tuple of at most ``limit`` distinct names (``F.name``), sorted."""
    what = "status.capabilities"
    if not isinstance(caps, tuple) or len(caps) > limit:
        raise DecodeError(f"{what}: expected at most {limit} names, saw {caps!r:.80}")
    for c in caps:
        F.name(c, what)
    if list(caps) != sorted(set(caps)):
        raise DecodeError(f"{what}: expected sorted, distinct names, saw {list(caps)!r:.80}")


#: ms: upper bounds of the inference latency histogram in ``inference`` telemetry (filled by
#: ``agent/observe.py``, merged by ``coordinator/telemetry.py``): a geometric ladder, factor
#: sqrt(2), 4 µs to ~12 s; bucket ``i`` counts latencies <= bound ``i`` (and > bound ``i-1``),
#: one more bucket past the end counts the rest. Lists of counts may be cut after the last
#: non-zero one.
LATENCY_BOUNDS_MS = tuple(round(0.004 * 2 ** (i / 2), 6) for i in range(44))
#: the confidence histogram of ``inference`` telemetry: 10 equal bins over [0, 1]
CONFIDENCE_BINS = 10
MAX_METRIC_DEPTH = 4  # nesting of objects/lists in telemetry metrics
MAX_METRIC_ITEMS = 1024  # keys and list items in one telemetry message, all levels


def _check_metrics(value: object, what: str) -> None:
    """Telemetry metrics: JSON values of bounded depth and size; numbers finite."""
    budget = [MAX_METRIC_ITEMS]

    def walk(v: object, where: str, depth: int) -> None:
        if v is None or isinstance(v, bool | str) or isinstance(v, int):
            if isinstance(v, str) and len(v) > 500:
                raise DecodeError(f"{where}: text of {len(v)} characters, at most 500")
            return
        if isinstance(v, float):
            if not math.isfinite(v):
                raise DecodeError(f"{where}: expected a finite number, saw {v}")
            return
        if depth >= MAX_METRIC_DEPTH or not isinstance(v, dict | list):
            raise DecodeError(f"{where}: expected a JSON value nested at most {MAX_METRIC_DEPTH}")
        budget[0] -= len(v)
        if budget[0] < 0:
            raise DecodeError(f"{what}: more than {MAX_METRIC_ITEMS} keys and items")
        items = v.items() if isinstance(v, dict) else enumerate(v)
        for k, item in items:
            if isinstance(k, str) and len(k) > 64:
                raise DecodeError(f"{where}: key of {len(k)} characters, at most 64")
            walk(item, f"{where}.{k}", depth + 1)

    if not isinstance(value, dict):
        raise DecodeError(f"{what}: expected an object, saw {type(value).__name__}")
    walk(value, what, 0)


@dataclass(frozen=True, kw_only=True)
class Telemetry:
    """Periodic metrics from a device (buffered while offline). Validated like the others.

    ``metrics`` is ``{namespace: payload}``, one entry per telemetry source of the agent's
    ``Reporter`` (``agent``: the daemon's own counters; ``inference``: per model key
    ``name@version``, see ``agent/observe.py``; ``drift``, ``shadow``, ``ab``: their features).
    Each payload covers the time since the previous message (counts are deltas), so buffered
    messages lose nothing. Bounded as a whole: depth 4, 1,024 keys and items, ``MAX_TELEMETRY``.
    """

    device_id: str
    time: int  # unix seconds
    metrics: dict[str, Any] = field(default_factory=dict)
    type: str = "telemetry"
    schema_version: int = 1

    def __post_init__(self) -> None:
        F.name(self.device_id, "telemetry.device_id")
        _u63(self.time, "telemetry.time")
        _check_metrics(self.metrics, "telemetry.metrics")

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
        F.check_keys(d, {"type", "schema_version", "device_id", "time", "metrics"}, w)
        return cls(
            device_id=F.field(d, "device_id", str, w),
            time=_u63(d.get("time"), "telemetry.time"),
            metrics=F.field(d, "metrics", dict, w),
        )
