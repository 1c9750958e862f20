"""The release manifest: everything a device must know about a bundle, signed as one blob.

The manifest travels as canonical JSON bytes with a detached signature; verification is
always over the bytes as received, and only then are they decoded (``Manifest.decode``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _fields as F
from .candidate import CandidateSpec
from .canonical import canonical_json, decode_json_object, hexbytes
from .errors import DecodeError
from .segments import MAX_SEGMENT, MIN_SEGMENT, ciphertext_size, segment_count

if TYPE_CHECKING:
    from .drift import ReferenceStats

__all__ = ["FORMATS", "MAX_MANIFEST", "Manifest", "SmokeVector", "TensorSpec"]

FORMATS = ("onnx", "tflite")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
MAX_MANIFEST = 1024 * 1024  # bytes; checked before any parsing
MAX_PLAINTEXT = 1 << 30  # bytes (1 GiB)
MAX_TARGETS = 10_000
MAX_SMOKE = 16
MAX_SMOKE_VALUES = 65_536


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # None = dynamic (batch)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise DecodeError(
                f"tensor {self.name!r}: dtype expected one of {DTYPES}, saw {self.dtype!r}"
            )
        if len(self.shape) > 8 or any(
            d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 0)
            for d in self.shape
        ):
            raise DecodeError(f"tensor {self.name!r}: bad shape {self.shape!r:.80}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: object) -> TensorSpec:
        if not isinstance(d, dict):
            raise DecodeError("tensor spec: expected an object")
        F.check_keys(d, {"name", "dtype", "shape"}, "tensor spec")
        shape = F.field(d, "shape", list, "tensor spec")
        return cls(
            name=F.field(d, "name", str, "tensor spec"),
            dtype=F.field(d, "dtype", str, "tensor spec"),
            shape=tuple(shape),
        )


def _matrix(value: object, what: str) -> tuple[tuple[float, ...], ...]:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise DecodeError(f"{what}: expected a non-empty list of rows")
    rows = tuple(tuple(r) for r in value)
    if sum(len(r) for r in rows) > MAX_SMOKE_VALUES:
        raise DecodeError(f"{what}: more than {MAX_SMOKE_VALUES} values")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:  # a matrix, as the runtime will take it: [batch, features]
        raise DecodeError(f"{what}: expected rows of equal length, saw lengths {widths[:8]}")
    for r in rows:
        for x in r:
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
                raise DecodeError(f"{what}: expected finite numbers, saw {x!r:.20}")
    return rows


@dataclass(frozen=True, kw_only=True)
class SmokeVector:
    """An input and the output the model must reproduce (within ``atol``) after install."""

    input: tuple[tuple[float, ...], ...]
    expected: tuple[tuple[float, ...], ...]
    atol: float = 1e-4

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": [list(r) for r in self.input],
            "expected": [list(r) for r in self.expected],
            "atol": self.atol,
        }

    @classmethod
    def from_dict(cls, d: object) -> SmokeVector:
        if not isinstance(d, dict):
            raise DecodeError("smoke vector: expected an object")
        F.check_keys(d, {"input", "expected", "atol"}, "smoke vector")
        atol = F.field(d, "atol", float, "smoke vector")
        if not 0 <= atol <= 1:
            raise DecodeError(f"smoke vector atol: expected in [0, 1], saw {atol}")
        return cls(
            input=_matrix(d.get("input"), "smoke.input"),
            expected=_matrix(d.get("expected"), "smoke.expected"),
            atol=atol,
        )


_FIELDS = {
    "type",
    "schema_version",
    "bundle_id",
    "name",
    "format",
    "sequence",
    "model_version",
    "created",
    "expires",
    "targets",
    "inputs",
    "outputs",
    "plaintext_size",
    "plaintext_sha256",
    "segment_size",
    "payload_size",
    "segment_hashes",
    "smoke",
    "reference_stats",
    "lineage",
    "candidate",
}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    bundle_id: str  # 32 hex digits (16 random bytes)
    name: str
    format: str  # "onnx" | "tflite"
    sequence: int  # monotonic release sequence; anti-rollback is on this
    model_version: str
    created: int  # unix seconds
    expires: int  # unix seconds
    targets: Mapping[str, str]  # device id -> SHA-256 (hex) of its key envelope
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    plaintext_size: int  # bytes
    plaintext_sha256: str
    segment_size: int  # bytes of plaintext per segment
    payload_size: int  # bytes of ciphertext
    segment_hashes: tuple[str, ...]  # SHA-256 of each encrypted segment
    smoke: tuple[SmokeVector, ...] = ()
    reference_stats: Mapping[str, Any] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    # a candidate release (shadow / A/B, ``protocol.candidate``); None: an ordinary release.
    # Encoded only when set, so an ordinary manifest's bytes are what they always were.
    candidate: CandidateSpec | None = None
    type: str = "manifest"
    schema_version: int = 1

    def __post_init__(self) -> None:
        hexbytes(self.bundle_id, what="manifest.bundle_id", length=16)
        F.name(self.name, "manifest.name")
        F.name(self.model_version, "manifest.model_version")
        if self.format not in FORMATS:
            raise DecodeError(
                f"manifest.format: expected one of {FORMATS}, saw {self.format!r:.20}"
            )
        if self.sequence < 1 or self.expires <= self.created:
            raise DecodeError("manifest: expected sequence >= 1 and expires > created")
        if not 0 < len(self.targets) <= MAX_TARGETS:
            raise DecodeError(f"manifest.targets: expected 1..{MAX_TARGETS} devices")
        for dev, digest in self.targets.items():
            F.name(dev, "manifest.targets device id")
            hexbytes(digest, what=f"manifest.targets[{dev}]", length=32)
        self._check_sizes()
        if len(self.smoke) > MAX_SMOKE:
            raise DecodeError(f"manifest.smoke: expected at most {MAX_SMOKE} vectors")
        reference = None
        if "drift_schema" in self.reference_stats:  # drift statistics: validated strictly
            from .drift import ReferenceStats

            reference = ReferenceStats.from_dict(self.reference_stats)
        object.__setattr__(self, "_drift_reference", reference)  # parsed once, not a field

    @property
    def drift_reference(self) -> ReferenceStats | None:
        """The validated drift reference statistics (None: the manifest carries none)."""
        ref: ReferenceStats | None = self.__dict__["_drift_reference"]
        return ref

    def _check_sizes(self) -> None:
        if not MIN_SEGMENT <= self.segment_size <= MAX_SEGMENT:
            raise DecodeError(
                f"manifest.segment_size: expected {MIN_SEGMENT}..{MAX_SEGMENT}, "
                f"saw {self.segment_size}"
            )
        if not 0 < self.plaintext_size <= MAX_PLAINTEXT:
            raise DecodeError(
                f"manifest.plaintext_size: expected 1..{MAX_PLAINTEXT}, saw {self.plaintext_size}"
            )
        n = segment_count(self.plaintext_size, self.segment_size)
        if len(self.segment_hashes) != n:
            raise DecodeError(
                f"manifest.segment_hashes: expected {n} hashes, saw {len(self.segment_hashes)}"
            )
        if self.payload_size != ciphertext_size(self.plaintext_size, self.segment_size):
            raise DecodeError(
                "manifest.payload_size does not match plaintext_size and segment_size"
            )
        hexbytes(self.plaintext_sha256, what="manifest.plaintext_sha256", length=32)
        for i, h in enumerate(self.segment_hashes):
            hexbytes(h, what=f"manifest.segment_hashes[{i}]", length=32)

    @property
    def segments(self) -> int:
        return len(self.segment_hashes)

    def segment_span(self, index: int) -> tuple[int, int]:
        """(offset, length) of encrypted segment ``index`` within the payload."""
        if not 0 <= index < self.segments:
            raise ValueError(f"segment index {index} outside 0..{self.segments - 1}")
        full = self.segment_size + 16
        length = full if index < self.segments - 1 else self.payload_size - full * index
        return full * index, length

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "schema_version": self.schema_version,
            "bundle_id": self.bundle_id,
            "name": self.name,
            "format": self.format,
            "sequence": self.sequence,
            "model_version": self.model_version,
            "created": self.created,
            "expires": self.expires,
            "targets": dict(self.targets),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "plaintext_size": self.plaintext_size,
            "plaintext_sha256": self.plaintext_sha256,
            "segment_size": self.segment_size,
            "payload_size": self.payload_size,
            "segment_hashes": list(self.segment_hashes),
            "smoke": [s.to_dict() for s in self.smoke],
            "reference_stats": dict(self.reference_stats),
            "lineage": dict(self.lineage),
        } | ({} if self.candidate is None else {"candidate": self.candidate.to_dict()})

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        w = "manifest"
        F.check_header(d, "manifest", 1, w)
        F.check_keys(d, _FIELDS, w)
        return cls(
            bundle_id=F.field(d, "bundle_id", str, w),
            name=F.field(d, "name", str, w),
            format=F.field(d, "format", str, w),
            sequence=F.field(d, "sequence", int, w),
            model_version=F.field(d, "model_version", str, w),
            created=F.field(d, "created", int, w),
            expires=F.field(d, "expires", int, w),
            targets=F.field(d, "targets", dict, w),
            inputs=_specs(F.field(d, "inputs", list, w)),
            outputs=_specs(F.field(d, "outputs", list, w)),
            plaintext_size=F.field(d, "plaintext_size", int, w),
            plaintext_sha256=F.field(d, "plaintext_sha256", str, w),
            segment_size=F.field(d, "segment_size", int, w),
            payload_size=F.field(d, "payload_size", int, w),
            segment_hashes=tuple(F.field(d, "segment_hashes", list, w)),
            smoke=tuple(
                SmokeVector.from_dict(s) for s in F.field(d, "smoke", list, w)[: MAX_SMOKE + 1]
            ),
            reference_stats=F.field(d, "reference_stats", dict, w),
            lineage=F.field(d, "lineage", dict, w),
            candidate=CandidateSpec.from_dict(d["candidate"]) if "candidate" in d else None,
        )

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        return cls.from_dict(decode_json_object(data, max_size=MAX_MANIFEST, what="manifest"))


def _specs(items: Sequence[object]) -> tuple[TensorSpec, ...]:
    if not 0 < len(items) <= 16:
        raise DecodeError("manifest: expected 1..16 tensor specs")
    return tuple(TensorSpec.from_dict(t) for t in items)
