"""Content-addressed blob storage on disk: ``blobs/sha256/ab/abcdef…``.

A blob's address is the SHA-256 of its plaintext, whatever is on disk, so deduplication and
the integrity check on read work for sealed and plain blobs alike. With a ``Vault``, ``put``
seals (model files: the secrets worth stealing); ``put_encrypted`` stores bytes that are
already ciphertext as they are (release payloads, AES-GCM under the release's content key,
which the registry keeps sealed): the chunk server reads those by ``path`` at segment offsets.
``get`` opens either form, so blobs written before encryption at rest still read (``reseal``
seals them). Directories are 0700 and files 0600, whatever the umask.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write, os_errors, private_dir
from edgefleet.protocol.errors import CorruptStateError

from .vault import Vault, blob_aad

__all__ = ["BlobStore"]


class BlobStore:
    def __init__(self, root: Path, vault: Vault | None = None) -> None:
        self.root = root
        self.vault = vault
        with os_errors(f"{root}: cannot create the blob store"):
            private_dir(root)

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"not a SHA-256 hex digest: {digest!r:.80}")
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data`` (sealed when the store has a vault); its SHA-256 hex digest."""
        digest = hashlib.sha256(data).hexdigest()
        if self.vault is None:
            return self._write(digest, data, replace=False)
        return self._write(digest, self.vault.seal(data, aad=blob_aad(digest)), replace=False)

    def put_encrypted(self, data: bytes) -> str:
        """Store ``data``, already ciphertext under a sealed key, as it is (served by path)."""
        return self._write(hashlib.sha256(data).hexdigest(), data, replace=False)

    def _write(self, digest: str, stored: bytes, *, replace: bool) -> str:
        path = self.path(digest)
        if replace or not path.exists():
            private_dir(path.parent.parent)
            private_dir(path.parent)
            atomic_write(path, stored, mode=0o600)
        return digest

    def get(self, digest: str) -> bytes:
        """The plaintext of a blob: ``ConfigError`` if it is sealed under a key the vault
        lacks; if it reads back wrong, ``CorruptStateError`` (``OSError`` without a vault)."""
        data = self.path(digest).read_bytes()
        if hashlib.sha256(data).hexdigest() == digest:
            return data  # plain: a payload, or a blob from before encryption at rest
        if self.vault is None:
            raise OSError(f"blob {digest[:16]}… is corrupt on disk")
        plain = self.vault.open(data, aad=blob_aad(digest), what=f"blob {digest[:16]}…")
        if hashlib.sha256(plain).hexdigest() != digest:
            raise CorruptStateError(f"blob {digest[:16]}… is corrupt on disk (wrong content)")
        return plain

    def is_plain(self, digest: str) -> bool:
        """Whether the blob is stored in plaintext (a payload, or from before sealing)."""
        return hashlib.sha256(self.path(digest).read_bytes()).hexdigest() == digest

    def is_sealed_current(self, digest: str) -> bool:
        """Whether the blob is sealed under the vault's sealing key (nothing to re-seal)."""
        if self.vault is None:
            return False
        with open(self.path(digest), "rb") as f:
            return self.vault.is_current(f.read(64))

    def reseal(self, digest: str) -> bool:
        """Seal the blob under the vault's current key if it is not (plain, or an older key);
        one atomic replace, so a crash leaves the old or the new form. True if rewritten."""
        if self.vault is None:
            raise RuntimeError("reseal needs a blob store with a vault")
        if self.is_sealed_current(digest):
            return False
        plain = self.get(digest)
        self._write(digest, self.vault.seal(plain, aad=blob_aad(digest)), replace=True)
        return True
