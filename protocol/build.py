"""Building a release: encrypt the payload once, wrap its key per device, sign its manifests.

A release's manifest is signed per shard of its targets: every shard names at most
``shard_size`` devices (their envelope digests) and is otherwise the same manifest (one bundle
id, sequence, payload and segment hashes). A device is offered its own shard only, so an offer's
size does not grow with the fleet, no device learns more than its shard's ids, and the device
verifies exactly what it always did: the signature, and that its envelope's digest is among the
signed manifest's targets (``verify.verify_manifest`` and ``select_envelope``).

Pure apart from drawing random bytes (content key, bundle id); the coordinator's bundler
adds storage and the registry around it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .candidate import CandidateSpec
from .container import encode_envelopes, encode_header
from .envelope import Envelope, wrap_key
from .keyring import Signature
from .keys import KemPublicKey, SigningKey
from .manifest import MAX_TARGETS, Manifest, SmokeVector, TensorSpec
from .segments import KEY_SIZE, SegmentCipher, ciphertext_size, sha256_hex

__all__ = ["SHARD_TARGETS", "BuiltRelease", "ReleaseSpec", "SignedManifest", "build_release",
           "rewrap"]  # fmt: skip

DEFAULT_SEGMENT = 256 * 1024  # bytes; one MQTT chunk per encrypted segment
SHARD_TARGETS = 64  # devices per signed manifest (an offer carries ~90 bytes per target)


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
class SignedManifest:
    """One signed manifest of a release, naming a bounded subset of its targets."""

    manifest: Manifest
    raw: bytes  # the bytes as signed
    signature: bytes  # an encoded ``Signature`` over ``raw``

    @property
    def first_target(self) -> str:
        return min(self.manifest.targets)


@dataclass(frozen=True, kw_only=True)
class BuiltRelease:
    """``shards``: the signed manifests, each target's envelope digest in exactly one, in
    device id order (a shard covers a contiguous run of the sorted ids)."""

    shards: tuple[SignedManifest, ...]
    envelopes: tuple[Envelope, ...]  # sorted by device id
    segments: tuple[bytes, ...]
    content_key: bytes  # secret: keep it to wrap for late joiners; never log it

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("a release needs at least one signed manifest")
        index = {dev: i for i, s in enumerate(self.shards) for dev in s.manifest.targets}
        object.__setattr__(self, "_shard_of", index)

    @property
    def manifest(self) -> Manifest:
        """The first shard's manifest: all but ``targets`` is the same in every shard."""
        return self.shards[0].manifest

    @property
    def manifest_raw(self) -> bytes:
        return self.shards[0].raw

    @property
    def signature_raw(self) -> bytes:
        return self.shards[0].signature

    @property
    def payload(self) -> bytes:
        return b"".join(self.segments)

    def shard_for(self, device_id: str) -> SignedManifest:
        """The signed manifest naming ``device_id`` (``KeyError`` for a non-target)."""
        index: dict[str, int] = self.__dict__["_shard_of"]
        return self.shards[index[device_id]]

    def envelope_for(self, device_id: str) -> Envelope:
        for env in self.envelopes:
            if env.device_id == device_id:
                return env
        raise KeyError(device_id)

    def to_file_bytes(self, keyring_raw: bytes, keyring_sig: bytes) -> bytes:
        """The ``.efb`` side-load form: one manifest and every envelope it names, so only a
        release of one shard has one (``ValueError`` otherwise)."""
        if len(self.shards) > 1:
            raise ValueError(
                f"release {self.manifest.sequence}: {len(self.envelopes)} devices in "
                f"{len(self.shards)} signed manifests; a side-load bundle carries one: build it "
                f"for at most {len(self.manifest.targets)} devices"
            )
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
    shard_size: int = SHARD_TARGETS,
) -> BuiltRelease:
    """Encrypt ``model`` once, wrap the key for each recipient, sign one manifest per
    ``shard_size`` recipients (in device id order)."""
    if not recipients:
        raise ValueError("a release needs at least one recipient device")
    if not 1 <= shard_size <= MAX_TARGETS:
        raise ValueError(f"shard size: expected 1..{MAX_TARGETS} devices, got {shard_size}")
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
        targets={e.device_id: e.digest for e in envelopes[:shard_size]},
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
    shards = [_signed(manifest, release_key)]
    for start in range(shard_size, len(envelopes), shard_size):
        targets = {e.device_id: e.digest for e in envelopes[start : start + shard_size]}
        shards.append(_signed(replace(manifest, targets=targets), release_key))
    return BuiltRelease(
        shards=tuple(shards), envelopes=envelopes, segments=segments, content_key=content_key
    )


def _signed(manifest: Manifest, key: SigningKey) -> SignedManifest:
    raw = manifest.encode()
    sig = Signature(keyid=key.keyid, sig=key.sign(raw)).encode()
    return SignedManifest(manifest=manifest, raw=raw, signature=sig)


def rewrap(
    content_key: bytes, bundle_id: str, recipients: Sequence[tuple[str, KemPublicKey]]
) -> list[Envelope]:
    """Fresh envelopes of an existing content key (e.g. to re-send a lost one)."""
    return [
        wrap_key(content_key, pub, bundle_id=bundle_id, device_id=dev) for dev, pub in recipients
    ]
