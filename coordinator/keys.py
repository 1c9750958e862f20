"""Coordinator keys: the root key, release keys, and the root-signed keyring.

``keys/root.json`` and ``keys/release-*.json`` (mode 0600) hold private seeds; ``root.pub`` is
what agents pin at enrollment. ``keyring.json`` holds the current keyring bytes and root
signature, shipped with every release. The root key can be moved offline after ``init``:
it is only needed to sign a new keyring (rotation, revocation).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.canonical import b64d, b64e, canonical_json
from edgefleet.protocol.errors import KeyringError
from edgefleet.protocol.keyring import KeyEntry, Keyring, Signature
from edgefleet.protocol.keys import SigningKey, encode_public_key

__all__ = ["CoordinatorKeys", "sign_keyring"]

log = logging.getLogger(__name__)
YEAR = 365 * 24 * 3600


def _save_key(path: Path, key: SigningKey) -> None:
    atomic_write(path, canonical_json({"keyid": key.keyid, "seed": b64e(key.raw())}), mode=0o600)


def _load_key(path: Path) -> SigningKey:
    return SigningKey.from_raw(b64d(json.loads(path.read_bytes())["seed"], what=str(path)))


def sign_keyring(root: SigningKey, keyring: Keyring) -> tuple[bytes, bytes]:
    raw = keyring.encode()
    return raw, Signature(keyid=root.keyid, sig=root.sign(raw)).encode()


@dataclass
class CoordinatorKeys:
    home: Path
    release: SigningKey
    keyring_raw: bytes
    keyring_sig: bytes

    @property
    def keyring(self) -> Keyring:
        return Keyring.decode(self.keyring_raw)

    @classmethod
    def create(cls, home: Path, *, now: int, lifetime: int = YEAR) -> CoordinatorKeys:
        keys = home / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        if (keys / "root.json").exists():
            raise FileExistsError(f"{keys / 'root.json'} exists: this home is already initialised")
        root, release = SigningKey.generate(), SigningKey.generate()
        _save_key(keys / "root.json", root)
        _save_key(keys / f"release-{release.keyid}.json", release)
        atomic_write(home / "root.pub", encode_public_key(root.public_raw))
        keyring = Keyring(
            version=1,
            expires=now + lifetime,
            root_keyid=root.keyid,
            keys=(
                KeyEntry(keyid=release.keyid, public=release.public_raw, expires=now + lifetime),
            ),
        )
        raw, sig = sign_keyring(root, keyring)
        cls._save_keyring(home, raw, sig)
        log.info("initialised coordinator keys: root %s, release %s", root.keyid, release.keyid)
        return cls(home, release, raw, sig)

    @staticmethod
    def _save_keyring(home: Path, raw: bytes, sig: bytes) -> None:
        atomic_write(
            home / "keyring.json", canonical_json({"keyring": b64e(raw), "signature": b64e(sig)})
        )

    @classmethod
    def load(cls, home: Path) -> CoordinatorKeys:
        """The keyring on disk decides which release key signs: each key has its own file,
        so a crash during rotation leaves the old keyring with the old key, or the new
        keyring with the new key, never a mix."""
        d = json.loads((home / "keyring.json").read_bytes())
        raw = b64d(d["keyring"], what="keyring")
        for entry in Keyring.decode(raw).keys:
            path = home / "keys" / f"release-{entry.keyid}.json"
            if path.exists():
                release = _load_key(path)
                break
        else:
            raise FileNotFoundError(
                f"{home / 'keys'}: no private key for any release key in the keyring"
            )
        return cls(home, release, raw, b64d(d["signature"], what="keyring signature"))

    def check(self, *, now: int, ttl: int) -> None:
        """Refuse to sign what agents would refuse: an expired keyring or release key."""
        keyring = self.keyring
        entry = keyring.release_key(self.release.keyid, now)  # UntrustedSignerError if expired
        if now >= keyring.expires:
            raise KeyringError(
                f"keyring v{keyring.version} expired at {keyring.expires}: run "
                "`edgefleet coordinator rotate-key` (needs the root key)"
            )
        if min(entry.expires, keyring.expires) < now + ttl:
            log.warning(
                "release key or keyring expires before this release does (%d s); rotate soon", ttl
            )

    def rotate(self, *, now: int, lifetime: int = YEAR) -> CoordinatorKeys:
        """New release key; the old one is dropped from a new keyring version (revoked)."""
        root = _load_key(self.home / "keys" / "root.json")
        release = SigningKey.generate()
        old = self.keyring
        keyring = Keyring(
            version=old.version + 1,
            expires=now + lifetime,
            root_keyid=root.keyid,
            keys=(
                KeyEntry(keyid=release.keyid, public=release.public_raw, expires=now + lifetime),
            ),
        )
        raw, sig = sign_keyring(root, keyring)
        _save_key(self.home / "keys" / f"release-{release.keyid}.json", release)
        self._save_keyring(self.home, raw, sig)  # the switch: one atomic replace
        (self.home / "keys" / f"release-{self.release.keyid}.json").unlink(missing_ok=True)
        log.info("rotated release key: keyring v%d, release %s", keyring.version, release.keyid)
        return CoordinatorKeys(self.home, release, raw, sig)
