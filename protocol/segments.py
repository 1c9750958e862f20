"""Segmented AES-256-GCM payload encryption (a streaming AEAD in the manner of Tink's).

The payload is cut into fixed-size plaintext segments; segment *i* is sealed with the bundle's
random content key, a nonce derived from *i* and the final-segment flag, and associated data
binding the bundle id, *i* and the flag. So segments cannot be reordered, dropped from the
end, moved between bundles or truncated without detection, and a device can verify and
decrypt chunk by chunk in bounded memory. The key is used for one bundle only, so
index-derived nonces never repeat under one key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptError

__all__ = [
    "KEY_SIZE",
    "TAG_SIZE",
    "SegmentCipher",
    "ciphertext_size",
    "segment_count",
    "sha256_hex",
]

KEY_SIZE = 32
TAG_SIZE = 16
BUNDLE_ID_SIZE = 16
_AAD_PREFIX = b"edgefleet/segment/v1"
MIN_SEGMENT = 1024
MAX_SEGMENT = 4 * 1024 * 1024


def segment_count(plaintext_size: int, segment_size: int) -> int:
    """Number of segments; an empty payload still has one (empty, final) segment."""
    return max(1, -(-plaintext_size // segment_size))


def ciphertext_size(plaintext_size: int, segment_size: int) -> int:
    return plaintext_size + TAG_SIZE * segment_count(plaintext_size, segment_size)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SegmentCipher:
    """Seals and opens the segments of one bundle's payload."""

    def __init__(self, key: bytes, bundle_id: bytes, segment_size: int) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"content key must be {KEY_SIZE} bytes, got {len(key)}")
        if len(bundle_id) != BUNDLE_ID_SIZE:
            raise ValueError(f"bundle id must be {BUNDLE_ID_SIZE} bytes, got {len(bundle_id)}")
        if not MIN_SEGMENT <= segment_size <= MAX_SEGMENT:
            raise ValueError(f"segment size must be in [{MIN_SEGMENT}, {MAX_SEGMENT}]")
        self._aead = AESGCM(key)
        self._bundle_id = bundle_id
        self.segment_size = segment_size

    def _nonce_aad(self, index: int, final: bool) -> tuple[bytes, bytes]:
        flag = b"\x01" if final else b"\x00"
        nonce = index.to_bytes(11, "big") + flag
        aad = _AAD_PREFIX + self._bundle_id + index.to_bytes(8, "big") + flag
        return nonce, aad

    def seal(self, index: int, plaintext: bytes, *, final: bool) -> bytes:
        if len(plaintext) > self.segment_size or (
            not final and len(plaintext) != self.segment_size
        ):
            raise ValueError("only the final segment may be shorter than the segment size")
        nonce, aad = self._nonce_aad(index, final)
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, index: int, ciphertext: bytes, *, final: bool) -> bytes:
        nonce, aad = self._nonce_aad(index, final)
        try:
            return self._aead.decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise DecryptError(
                f"segment {index} (final={final}): AES-GCM tag did not authenticate"
            ) from exc

    def seal_all(self, plaintext: bytes) -> Iterator[bytes]:
        """Yield every encrypted segment of ``plaintext`` in order."""
        n = segment_count(len(plaintext), self.segment_size)
        for i in range(n):
            chunk = plaintext[i * self.segment_size : (i + 1) * self.segment_size]
            yield self.seal(i, chunk, final=i == n - 1)
