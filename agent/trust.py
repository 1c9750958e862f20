"""The agent's trusted state on disk: the pinned root key and the newest accepted keyring.

The highest accepted release sequence lives in the model store's pointer file, so that the
switch to a new version and the anti-rollback bump are one atomic write.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.canonical import b64d, b64e, canonical_json
from edgefleet.protocol.errors import StoreError
from edgefleet.protocol.keyring import Keyring
from edgefleet.protocol.keys import decode_public_key, encode_public_key
from edgefleet.protocol.verify import verify_keyring

__all__ = ["TrustStore"]

log = logging.getLogger(__name__)


class TrustStore:
    ROOT = "root.pub"
    KEYRING = "keyring.json"

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.root_public = decode_public_key((directory / self.ROOT).read_bytes())
        except OSError as exc:
            raise StoreError(
                f"{directory / self.ROOT}: no pinned root key ({exc.strerror})"
            ) from exc
        self.keyring: Keyring | None = None
        path = directory / self.KEYRING
        if path.exists():
            d = json.loads(path.read_bytes())
            self.keyring = Keyring.decode(b64d(d["keyring"], what="stored keyring"))

    @classmethod
    def pin(cls, directory: Path, root_public: bytes) -> TrustStore:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / cls.ROOT, encode_public_key(root_public))
        return cls(directory)

    def accept(self, raw: bytes, sig: bytes, *, now: int) -> Keyring:
        """Verify a keyring from the network; persist it if it is newer than ours."""
        keyring = verify_keyring(self.root_public, raw, sig, now=now, current=self.keyring)
        if self.keyring is None or keyring.version > self.keyring.version:
            doc = {"keyring": b64e(raw), "signature": b64e(sig)}
            atomic_write(self.dir / self.KEYRING, canonical_json(doc))
            log.info(
                "trusted keyring is now v%d (%d release keys)", keyring.version, len(keyring.keys)
            )
            self.keyring = keyring
        return keyring
