"""Per-device key envelopes: the content key wrapped with HPKE (RFC 9180).

Suite: the device's KEM (X25519, or the ML-KEM-768+X25519 hybrid), HKDF-SHA256, AES-256-GCM.
The HPKE ``info`` binds the envelope to one bundle and one device, so an envelope cannot be
replayed for another bundle or handed to another device. Which envelope belongs to a device
is also pinned by the signed manifest (its SHA-256 is listed next to the device id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hpke

from .canonical import b64d, b64e
from .errors import DecodeError, DecryptError
from .keys import KEM_HYBRID, KEM_X25519, KEMS, KemPrivateKey, KemPublicKey
from .segments import KEY_SIZE, sha256_hex

__all__ = ["Envelope", "unwrap_key", "wrap_key"]

_KEM_IDS = {KEM_X25519: hpke.KEM.X25519, KEM_HYBRID: hpke.KEM.MLKEM768_X25519}
MAX_ENVELOPE = 4096


def _suite(kem: str) -> Any:
    return hpke.Suite(_KEM_IDS[kem], hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(bundle_id: str, device_id: str) -> bytes:
    return f"edgefleet/envelope/v1|{bundle_id}|{device_id}".encode()


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """The content key of one bundle, sealed to one device."""

    device_id: str
    kem: str
    sealed: bytes

    def __post_init__(self) -> None:
        if self.kem not in KEMS:
            raise DecodeError(f"envelope KEM: expected one of {KEMS}, saw {self.kem!r}")
        if not 0 < len(self.sealed) <= MAX_ENVELOPE:
            raise DecodeError(f"envelope: expected 1..{MAX_ENVELOPE} bytes, saw {len(self.sealed)}")

    def to_dict(self) -> dict[str, str]:
        return {"device_id": self.device_id, "kem": self.kem, "sealed": b64e(self.sealed)}

    @classmethod
    def from_dict(cls, d: object) -> Envelope:
        if not isinstance(d, dict) or set(d) != {"device_id", "kem", "sealed"}:
            raise DecodeError("envelope: expected an object with device_id, kem, sealed")
        if not isinstance(d["device_id"], str) or not isinstance(d["kem"], str):
            raise DecodeError("envelope: device_id and kem must be strings")
        sealed = b64d(d["sealed"], what="envelope.sealed", max_len=MAX_ENVELOPE)
        return cls(device_id=d["device_id"], kem=d["kem"], sealed=sealed)

    @property
    def digest(self) -> str:
        """SHA-256 over the sealed bytes; the manifest lists it per target device."""
        return sha256_hex(self.sealed)


def wrap_key(
    content_key: bytes, recipient: KemPublicKey, *, bundle_id: str, device_id: str
) -> Envelope:
    if len(content_key) != KEY_SIZE:
        raise ValueError(f"content key must be {KEY_SIZE} bytes")
    sealed = _suite(recipient.kem).encrypt(
        content_key, recipient.hpke_key(), info=_info(bundle_id, device_id)
    )
    return Envelope(device_id=device_id, kem=recipient.kem, sealed=sealed)


def unwrap_key(envelope: Envelope, private: KemPrivateKey, *, bundle_id: str) -> bytes:
    if envelope.kem != private.kem:
        raise DecryptError(f"envelope KEM: expected {private.kem}, saw {envelope.kem}")
    try:
        key = _suite(private.kem).decrypt(
            envelope.sealed, private.hpke_key(), info=_info(bundle_id, envelope.device_id)
        )
    except Exception as exc:  # the binding raises several types; all mean "not for us"
        raise DecryptError(f"envelope for {envelope.device_id}: HPKE open failed") from exc
    if len(key) != KEY_SIZE:
        raise DecryptError(f"envelope: expected a {KEY_SIZE}-byte key, saw {len(key)}")
    return bytes(key)
