"""Building a release: encrypt the payload once, wrap its key per device, sign the manifest.

Pure apart from drawing random bytes (content key, bundle id); the coordinator's bundler
adds storage and the registry around it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .candidate import CandidateSpec
from .container import encode_envelopes, encode_header
from .envelope import Envelope, wrap_key
from .keyring import Signature
from .keys import KemPublicKey, SigningKey
from .manifest import Manifest, SmokeVector, TensorSpec
from .segments import KEY_SIZE, SegmentCipher, ciphertext_size, sha256_hex

__all__ = ["BuiltRelease", "ReleaseSpec", "build_release", "rewrap"]

DEFAULT_SEGMENT = 256 * 1024  # bytes; one MQTT chunk per encrypted segment


@dataclass(frozen=True, kw_only=True)
class ReleaseSpec:
    """What to release, independent of keys and recipients."""

    name: str
    format: str
    model_version: str
    sequence: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    created: int  # unix seconds
    ttl: int = 30 * 24 * 3600  # seconds until the manifest expires
    segment_size: int = DEFAULT_SEGMENT
    smoke: tuple[SmokeVector, ...] = ()
    reference_stats: Mapping[str, Any] = field(default_factory=dict)
    lineage: Mapping[str, Any] = field(default_factory=dict)
    candidate: CandidateSpec | None = None  # signed: a shadow / A/B candidate release


@dataclass(frozen=True, kw_only=True)
class BuiltRelease:
    manifest: Manifest
    manifest_raw: bytes
    signature_raw: bytes
    envelopes: tuple[Envelope, ...]
    segments: tuple[bytes, ...]
    content_key: bytes  # secret: keep it to wrap for late joiners; never log it

    @property
    def payload(self) -> bytes:
        return b"".join(self.segments)

    def envelope_for(self, device_id: str) -> Envelope:
        for env in self.envelopes:
            if env.device_id == device_id:
                return env
        raise KeyError(device_id)

    def to_file_bytes(self, keyring_raw: bytes, keyring_sig: bytes) -> bytes:
        """The ``.efb`` side-load form."""
        env = encode_envelopes(list(self.envelopes))
        head = encode_header(
            keyring=len(keyring_raw),
            keyring_sig=len(keyring_sig),
            manifest=len(self.manifest_raw),
            signature=len(self.signature_raw),
            envelopes=len(env),
            payload=self.manifest.payload_size,
        )
        return b"".join(
            [
                head,
                keyring_raw,
                keyring_sig,
                self.manifest_raw,
                self.signature_raw,
                env,
                self.payload,
            ]
        )


def build_release(
    model: bytes,
    spec: ReleaseSpec,
    *,
    release_key: SigningKey,
    recipients: Mapping[str, KemPublicKey],
) -> BuiltRelease:
    """Encrypt ``model`` once, wrap the key for each recipient, sign the manifest."""
    if not recipients:
        raise ValueError("a release needs at least one recipient device")
    content_key = secrets.token_bytes(KEY_SIZE)
    bundle_id = secrets.token_bytes(16)
    cipher = SegmentCipher(content_key, bundle_id, spec.segment_size)
    segments = tuple(cipher.seal_all(model))
    bundle_hex = bundle_id.hex()
    envelopes = tuple(
        wrap_key(content_key, pub, bundle_id=bundle_hex, device_id=dev)
        for dev, pub in sorted(recipients.items())
    )
    manifest = Manifest(
        bundle_id=bundle_hex,
        name=spec.name,
        format=spec.format,
        sequence=spec.sequence,
        model_version=spec.model_version,
        created=spec.created,
        expires=spec.created + spec.ttl,
        targets={e.device_id: e.digest for e in envelopes},
        inputs=spec.inputs,
        outputs=spec.outputs,
        plaintext_size=len(model),
        plaintext_sha256=hashlib.sha256(model).hexdigest(),
        segment_size=spec.segment_size,
        payload_size=ciphertext_size(len(model), spec.segment_size),
        segment_hashes=tuple(sha256_hex(s) for s in segments),
        smoke=spec.smoke,
        reference_stats=spec.reference_stats,
        lineage=spec.lineage,
        candidate=spec.candidate,
    )
    raw = manifest.encode()
    sig = Signature(keyid=release_key.keyid, sig=release_key.sign(raw)).encode()
    return BuiltRelease(
        manifest=manifest,
        manifest_raw=raw,
        signature_raw=sig,
        envelopes=envelopes,
        segments=segments,
        content_key=content_key,
    )


def rewrap(
    content_key: bytes, bundle_id: str, recipients: Sequence[tuple[str, KemPublicKey]]
) -> list[Envelope]:
    """Fresh envelopes of an existing content key (e.g. to re-send a lost one)."""
    return [
        wrap_key(content_key, pub, bundle_id=bundle_id, device_id=dev) for dev, pub in recipients
    ]
