"""Key material: Ed25519 signing keys, device KEM keys (X25519 or ML-KEM-768+X25519), key ids.

All functions are pure (bytes in, bytes or key objects out). Storing keys is the caller's job.
Raw encodings:
- Ed25519 private: 32-byte seed; public: 32 bytes.
- KEM ``x25519``: private 32 bytes, public 32 bytes.
- KEM ``mlkem768-x25519``: private = ML-KEM-768 seed (64) || X25519 private (32);
  public = ML-KEM-768 public (1184) || X25519 public (32).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ed25519, mlkem, x25519

from .errors import DecodeError, SignatureError

__all__ = [
    "KEMS",
    "KemPrivateKey",
    "KemPublicKey",
    "SigningKey",
    "generate_kem_key",
    "key_id",
    "verify_signature",
]

KEM_X25519 = "x25519"
KEM_HYBRID = "mlkem768-x25519"
KEMS = (KEM_X25519, KEM_HYBRID)
_MLKEM_PUB = 1184
_MLKEM_SEED = 64
_X25519 = 32


def key_id(public_raw: bytes) -> str:
    """Stable identifier of a public key: first 16 bytes of its SHA-256, as hex."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its id."""

    private: ed25519.Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, seed: bytes) -> SigningKey:
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(ed25519.Ed25519PrivateKey.from_private_bytes(seed))

    def raw(self) -> bytes:
        return self.private.private_bytes_raw()

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    @property
    def keyid(self) -> str:
        return key_id(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def verify_signature(public_raw: bytes, signature: bytes, data: bytes, *, what: str) -> None:
    """Raise ``SignatureError`` unless ``signature`` is a valid Ed25519 signature of ``data``."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"{what}: signature by key {key_id(public_raw)} does not verify over the "
            f"{len(data)} bytes received"
        ) from exc


@dataclass(frozen=True)
class KemPublicKey:
    """A device's public key for HPKE envelopes."""

    kem: str
    raw: bytes

    def __post_init__(self) -> None:
        want = {KEM_X25519: _X25519, KEM_HYBRID: _MLKEM_PUB + _X25519}.get(self.kem)
        if want is None:
            raise DecodeError(f"KEM: expected one of {KEMS}, saw {self.kem!r}")
        if len(self.raw) != want:
            raise DecodeError(f"{self.kem} public key: expected {want} bytes, saw {len(self.raw)}")

    def hpke_key(self) -> Any:
        if self.kem == KEM_X25519:
            return x25519.X25519PublicKey.from_public_bytes(self.raw)
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM_PUB]),
            x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM_PUB:]),
        )


@dataclass(frozen=True)
class KemPrivateKey:
    """A device's private key for HPKE envelopes. Never leaves the device."""

    kem: str
    raw: bytes

    def __post_init__(self) -> None:
        want = {KEM_X25519: _X25519, KEM_HYBRID: _MLKEM_SEED + _X25519}.get(self.kem)
        if want is None:
            raise ValueError(f"KEM: expected one of {KEMS}, saw {self.kem!r}")
        if len(self.raw) != want:
            raise ValueError(f"{self.kem} private key: expected {want} bytes, saw {len(self.raw)}")

    def hpke_key(self) -> Any:
        if self.kem == KEM_X25519:
            return x25519.X25519PrivateKey.from_private_bytes(self.raw)
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.raw[:_MLKEM_SEED]),
            x25519.X25519PrivateKey.from_private_bytes(self.raw[_MLKEM_SEED:]),
        )

    def public(self) -> KemPublicKey:
        if self.kem == KEM_X25519:
            pub = x25519.X25519PrivateKey.from_private_bytes(self.raw).public_key()
            return KemPublicKey(self.kem, pub.public_bytes_raw())
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.raw[:_MLKEM_SEED]).public_key()
        x = x25519.X25519PrivateKey.from_private_bytes(self.raw[_MLKEM_SEED:]).public_key()
        return KemPublicKey(self.kem, m.public_bytes_raw() + x.public_bytes_raw())


def generate_kem_key(kem: str = KEM_X25519) -> KemPrivateKey:
    """Make a fresh device decryption key of the given KEM."""
    x = x25519.X25519PrivateKey.generate().private_bytes_raw()
    if kem == KEM_X25519:
        return KemPrivateKey(kem, x)
    if kem == KEM_HYBRID:
        return KemPrivateKey(kem, mlkem.MLKEM768PrivateKey.generate().private_bytes_raw() + x)
    raise ValueError(f"KEM: expected one of {KEMS}, saw {kem!r}")


def encode_public_key(public_raw: bytes) -> bytes:
    """The file form of an Ed25519 public key (e.g. the root key agents pin)."""
    from .canonical import b64e, canonical_json

    return canonical_json(
        {"type": "ed25519-public", "keyid": key_id(public_raw), "public": b64e(public_raw)}
    )


def decode_public_key(data: bytes) -> bytes:
    from .canonical import b64d, decode_json_object

    d = decode_json_object(data, max_size=4096, what="public key file")
    if d.get("type") != "ed25519-public":
        raise DecodeError(
            f"public key file: expected type 'ed25519-public', saw {d.get('type')!r:.40}"
        )
    raw = b64d(d.get("public"), what="public key", max_len=32)
    if len(raw) != 32 or d.get("keyid") != key_id(raw):
        raise DecodeError("public key file: key id does not match the 32-byte key")
    return raw
