"""Encryption at rest on the coordinator: content keys and model blobs sealed with the
operator's storage key (AES-256-GCM, ``cryptography``'s AESGCM).

Sealed form::

    header = b"EFS" | version (1 byte) | key id (8 bytes) | nonce (12 random bytes)
    sealed = header | AES-256-GCM(plaintext) (ciphertext and 16-byte tag)

The additional data is the header, a label of what the item is and what binds it to its place
(a blob's SHA-256, a release's bundle id and sequence), so a sealed item cannot be moved to
another row or file, nor its header edited, without failing authentication.

The storage key is 32 random bytes written as 64 hex characters: in a file
(``storage_key_file``, mode 0600 in a 0700 directory) or in an environment variable whose
name is ``storage_key_env`` (read by the CLI only, which passes the key in). Its key id, the
first 8 bytes of SHA-256 over a label and the key, names it in headers and messages without
revealing it. A ``Vault`` seals with one key and opens with any key it holds (rotation: the new
key seals, the old one still opens until everything is re-sealed).

Errors say who must act: an item sealed under a key the vault does not hold (a wrong or
missing storage key) is a ``ConfigError``; one that fails authentication under the right key,
or is not in sealed form, a ``CorruptStateError`` (damaged or edited on disk).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from edgefleet.infra.fsutil import atomic_write, os_errors, private_dir
from edgefleet.protocol.errors import ConfigError, CorruptStateError

__all__ = [
    "HEADER_SIZE",
    "StorageKey",
    "Vault",
    "blob_aad",
    "content_key_aad",
    "read_key_file",
    "write_key_file",
]

MAGIC = b"EFS"
VERSION = 1
KEY_SIZE = 32  # bytes: AES-256
KEYID_SIZE = 8  # bytes
NONCE_SIZE = 12  # bytes: random per seal (2^-32 collision odds after 2^32 seals of one key)
HEADER_SIZE = len(MAGIC) + 1 + KEYID_SIZE + NONCE_SIZE
TAG_SIZE = 16
MAX_KEY_TEXT = 256  # bytes of a key file or variable we read


def blob_aad(digest: str) -> bytes:
    return b"edgefleet blob\0" + digest.encode()


def content_key_aad(bundle_id: str, sequence: int) -> bytes:
    return b"edgefleet content key\0" + f"{bundle_id}\0{sequence}".encode()


@dataclass(frozen=True, kw_only=True)
class StorageKey:
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_SIZE:
            raise ValueError(f"a storage key is {KEY_SIZE} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> StorageKey:
        return cls(raw=os.urandom(KEY_SIZE))

    @property
    def keyid(self) -> str:
        return hashlib.sha256(b"edgefleet storage key id\0" + self.raw).digest()[:KEYID_SIZE].hex()

    def encode(self) -> bytes:
        return self.raw.hex().encode() + b"\n"

    @classmethod
    def decode(cls, text: str | bytes, *, source: str) -> StorageKey:
        """A key as ``encode`` writes it; ``ConfigError`` naming ``source`` otherwise."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        try:
            raw = bytes.fromhex(text.strip()[: 2 * MAX_KEY_TEXT])
            return cls(raw=raw)
        except ValueError:
            raise ConfigError(
                f"{source}: not a storage key (expected {2 * KEY_SIZE} hex characters)"
            ) from None


def read_key_file(path: Path) -> StorageKey:
    with os_errors(f"{path}: cannot read the storage key"):
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_TEXT + 1)
    if len(data) > MAX_KEY_TEXT:
        raise ConfigError(f"{path}: not a storage key (longer than {MAX_KEY_TEXT} bytes)")
    return StorageKey.decode(data, source=str(path))


def write_key_file(path: Path, key: StorageKey) -> None:
    """Write ``key`` atomically, mode 0600, in a 0700 directory."""
    with os_errors(f"{path}: cannot save the storage key"):
        private_dir(path.parent)
        atomic_write(path, key.encode(), mode=0o600)


class Vault:
    """Seals with ``key``; opens what any of ``key`` and ``also`` sealed.

    ``Vault.unavailable(reason)`` stands for a key the operator has not provided: every use
    raises ``ConfigError(reason)``, so commands that need no secret still run.
    """

    def __init__(self, key: StorageKey | None, *, also: Sequence[StorageKey] = (),
                 missing: str = "no storage key") -> None:  # fmt: skip
        self.key = key
        self._missing = missing
        self._keys = {k.keyid: k for k in (*also, *([key] if key else []))}

    @classmethod
    def unavailable(cls, reason: str) -> Vault:
        return cls(None, missing=reason)

    @property
    def keyid(self) -> str:
        """The id of the key that seals; ``ConfigError`` if there is none."""
        return self.require().keyid

    def require(self) -> StorageKey:
        """The key that seals; ``ConfigError`` if the operator has not provided it."""
        if self.key is None:
            raise ConfigError(self._missing)
        return self.key

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        key = self.require()
        header = MAGIC + bytes([VERSION]) + bytes.fromhex(key.keyid) + os.urandom(NONCE_SIZE)
        return header + AESGCM(key.raw).encrypt(header[-NONCE_SIZE:], plaintext, header + aad)

    def open(self, sealed: bytes, *, aad: bytes, what: str) -> bytes:
        """The plaintext of ``sealed``; ``what`` names it in errors ("blob 3fa2…")."""
        keyid = sealed_keyid(sealed)
        if keyid is None:
            raise CorruptStateError(f"{what}: not in sealed form (damaged on disk?)")
        key = self._keys.get(keyid)
        if key is None:
            have = self.key.keyid if self.key else "(none)"
            hint = self._missing if self.key is None else "point the coordinator at that key"
            raise ConfigError(
                f"storage key {have} does not open {what} (sealed under storage key {keyid}): "
                f"{hint}"
            )
        header = sealed[:HEADER_SIZE]
        try:
            return AESGCM(key.raw).decrypt(header[-NONCE_SIZE:], sealed[HEADER_SIZE:], header + aad)
        except InvalidTag:
            raise CorruptStateError(
                f"{what}: fails authentication under storage key {keyid} (damaged or edited "
                "on disk)"
            ) from None

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` is sealed under the key this vault seals with."""
        return self.key is not None and sealed_keyid(sealed) == self.key.keyid


def sealed_keyid(data: bytes) -> str | None:
    """The key id in a sealed item's header; None if ``data`` is not in sealed form."""
    if len(data) < HEADER_SIZE + TAG_SIZE or data[:3] != MAGIC or data[3] != VERSION:
        return None
    return data[4 : 4 + KEYID_SIZE].hex()
