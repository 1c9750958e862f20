"""The agent's trusted state on disk: the pinned root key and the newest accepted keyring.

The highest accepted release sequence lives in the model store's pointer file, so that the
switch to a new version and the anti-rollback bump are one atomic write.

Nothing read back from disk is trusted for having been written by us (python-tuf re-verifies
everything it loads): the stored keyring is re-verified against the pinned root on every
load, with the checks it passed when it was accepted that do not depend on the clock (size,
root key id, signature over the bytes as stored, shape, names that root). Expiry is checked
where the keyring is used (``verify_manifest``), so an expired stored keyring still serves as
the newest trusted version that offers are compared against. A stored keyring that fails is
not trusted: ``problem`` says why (logged as a warning), and the store works from the pinned
root alone, so a valid keyring arriving with the next offer is accepted and replaces it. Bad
trust state on disk never bricks the device; only an unreadable pinned root key is fatal.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write, os_errors, private_dir
from edgefleet.protocol.errors import BundleError, CorruptStateError, StoreError
from edgefleet.protocol.keyring import (
    MAX_KEYRING_FILE,
    Keyring,
    decode_keyring_file,
    encode_keyring_file,
)
from edgefleet.protocol.keys import decode_public_key, encode_public_key
from edgefleet.protocol.verify import verify_keyring, verify_keyring_signature

__all__ = ["TrustStore"]

log = logging.getLogger(__name__)
MAX_STORED = MAX_KEYRING_FILE  # bytes read of keyring.json


class TrustStore:
    ROOT = "root.pub"
    KEYRING = "keyring.json"

    def __init__(self, directory: Path) -> None:
        """Load the pinned root (``StoreError``/``CorruptStateError`` if unreadable: fatal)
        and the stored keyring, re-verified (if that fails: not trusted, see ``problem``)."""
        self.dir = directory
        self.root_public = _read_root(directory / self.ROOT)
        self.keyring: Keyring | None = None
        self.problem: StoreError | None = None  # why the stored keyring is not trusted
        try:
            self.keyring = self._load_keyring(directory / self.KEYRING)
        except StoreError as exc:
            self.problem = exc
            log.warning("%s; trusting only the pinned root until a valid keyring arrives", exc)

    @classmethod
    def pin(cls, directory: Path, root_public: bytes) -> TrustStore:
        with os_errors(f"{directory / cls.ROOT}: cannot pin the root key"):
            private_dir(directory)  # 0700: nobody else may replace the pinned root
            atomic_write(directory / cls.ROOT, encode_public_key(root_public))
        return cls(directory)

    def accept(self, raw: bytes, sig: bytes, *, now: int) -> Keyring:
        """Verify a keyring from the network; persist it if it is newer than ours."""
        keyring = verify_keyring(self.root_public, raw, sig, now=now, current=self.keyring)
        if self.keyring is None or keyring.version > self.keyring.version:
            path = self.dir / self.KEYRING
            with os_errors(f"{path}: cannot save keyring v{keyring.version}"):
                atomic_write(path, encode_keyring_file(raw, sig))
            log.info(
                "trusted keyring is now v%d (%d release keys)", keyring.version, len(keyring.keys)
            )
            self.keyring, self.problem = keyring, None
        return keyring

    def _load_keyring(self, path: Path) -> Keyring | None:
        with os_errors(f"{path}: cannot read the stored keyring"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None  # none accepted yet
        try:
            raw, sig = decode_keyring_file(data, "stored keyring")
        except BundleError as exc:
            raise CorruptStateError(f"{path}: not a stored keyring file ({exc})") from exc
        try:
            return verify_keyring_signature(self.root_public, raw, sig)
        except BundleError as exc:
            raise CorruptStateError(
                f"{path}: the stored keyring does not verify against the pinned root ({exc})"
            ) from exc


def _read_root(path: Path) -> bytes:
    with os_errors(f"{path}: no pinned root key"):
        data = path.read_bytes()
    try:
        return decode_public_key(data)
    except BundleError as exc:
        raise CorruptStateError(f"{path}: the pinned root key is unreadable ({exc})") from exc
