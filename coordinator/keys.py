"""Coordinator keys: the root key, release keys, and the root-signed keyring.

``keys/root.json`` and ``keys/release-*.json`` (mode 0600) hold private seeds; ``root.pub`` is
what agents pin at enrollment. ``keyring.json`` holds the current keyring bytes and root
signature, shipped with every release. The root key can be moved offline after ``init``:
it is only needed to sign a new keyring (rotation, revocation).

What is read back is checked as an agent would check it: ``load`` re-verifies the keyring
against ``root.pub`` and that the release key file holds the key the keyring names. Errors
say who must act: an unreadable file is a ``StoreError``, one that reads back wrong (or a
keyring that no longer verifies) a ``CorruptStateError``, and an expired keyring or release
key, a missing release or root key, a ``ConfigError`` (``KeyExpiredError``): the operator's
to fix, never a ``BundleError``, which means untrusted input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write, os_errors, private_dir
from edgefleet.protocol._fields import check_keys, field
from edgefleet.protocol.canonical import b64d, b64e, canonical_json, decode_json_object
from edgefleet.protocol.errors import BundleError, ConfigError, CorruptStateError, KeyExpiredError
from edgefleet.protocol.keyring import (
    KeyEntry,
    Keyring,
    Signature,
    decode_keyring_file,
    encode_keyring_file,
)
from edgefleet.protocol.keys import SigningKey, decode_public_key, encode_public_key
from edgefleet.protocol.verify import verify_keyring_signature

__all__ = ["CoordinatorKeys", "sign_keyring"]

log = logging.getLogger(__name__)
YEAR = 365 * 24 * 3600
ROTATE = "run `edgefleet coordinator rotate-key` (needs the root key)"


def _save_key(path: Path, key: SigningKey) -> None:
    with os_errors(f"{path}: cannot save the key"):
        data = canonical_json({"keyid": key.keyid, "seed": b64e(key.raw())})
        atomic_write(path, data, mode=0o600)


def _read(path: Path, what: str) -> bytes:
    with os_errors(f"{path}: cannot read the {what}"):
        return path.read_bytes()


def _load_key(path: Path) -> SigningKey:
    data = _read(path, "key")
    try:
        d = decode_json_object(data, max_size=4096, what="key file")
        check_keys(d, {"keyid", "seed"}, "key file")
        key = SigningKey.from_raw(b64d(d.get("seed"), what="key file seed", max_len=64))
        keyid = field(d, "keyid", str, "key file")
    except (BundleError, ValueError) as exc:  # ValueError: a seed of the wrong size
        raise CorruptStateError(f"{path}: not a signing key file ({exc})") from exc
    if keyid != key.keyid:
        raise CorruptStateError(f"{path}: names key {keyid:.40}, holds key {key.keyid}")
    return key


def _load_keyring(home: Path) -> tuple[bytes, bytes]:
    """The keyring bytes and root signature in ``keyring.json``, verified against ``root.pub``."""
    path, root_path = home / "keyring.json", home / "root.pub"
    data, root_data = _read(path, "keyring"), _read(root_path, "root public key")
    try:
        root_public = decode_public_key(root_data)
    except BundleError as exc:
        raise CorruptStateError(f"{root_path}: not a public key file ({exc})") from exc
    try:
        raw, sig = decode_keyring_file(data)
    except BundleError as exc:
        raise CorruptStateError(f"{path}: not a keyring file ({exc})") from exc
    try:
        verify_keyring_signature(root_public, raw, sig)
    except BundleError as exc:
        raise CorruptStateError(f"{path}: does not verify against {root_path} ({exc})") from exc
    return raw, sig


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
        with os_errors(f"{keys}: cannot create the key directory"):
            private_dir(keys)  # 0700, whatever the umask
        if (keys / "root.json").exists():
            raise FileExistsError(f"{keys / 'root.json'} exists: this home is already initialised")
        root, release = SigningKey.generate(), SigningKey.generate()
        _save_key(keys / "root.json", root)
        _save_key(keys / f"release-{release.keyid}.json", release)
        with os_errors(f"{home / 'root.pub'}: cannot save the root public key"):
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
        path = home / "keyring.json"
        with os_errors(f"{path}: cannot save the keyring"):
            atomic_write(path, encode_keyring_file(raw, sig))

    @classmethod
    def load(cls, home: Path) -> CoordinatorKeys:
        """The keyring on disk decides which release key signs: each key has its own file,
        so a crash during rotation leaves the old keyring with the old key, or the new
        keyring with the new key, never a mix. The keyring is re-verified against
        ``root.pub`` (not its expiry: an expired keyring must still load to be rotated)."""
        raw, sig = _load_keyring(home)
        keyring = Keyring.decode(raw)
        for entry in keyring.keys:
            path = home / "keys" / f"release-{entry.keyid}.json"
            if path.exists():
                release = _load_key(path)
                break
        else:
            raise ConfigError(
                f"{home / 'keys'}: no private key for any release key in keyring "
                f"v{keyring.version} (expected release-<keyid>.json for one of "
                f"{[e.keyid for e in keyring.keys]})"
            )
        if release.public_raw != entry.public:
            raise CorruptStateError(f"{path}: does not hold the key keyring.json names")
        return cls(home, release, raw, sig)

    def check(self, *, now: int, ttl: int) -> None:
        """Refuse to sign what agents would refuse: an expired keyring or release key
        (``KeyExpiredError``: the operator must rotate, nothing received is at fault)."""
        keyring = self.keyring
        if now >= keyring.expires:
            raise KeyExpiredError(
                f"keyring v{keyring.version} expired at {keyring.expires}, now {now}: {ROTATE}"
            )
        entry = next((e for e in keyring.keys if e.keyid == self.release.keyid), None)
        if entry is None:
            raise ConfigError(
                f"release key {self.release.keyid}: not in keyring v{keyring.version}: {ROTATE}"
            )
        if now >= entry.expires:
            raise KeyExpiredError(
                f"release key {entry.keyid} expired at {entry.expires}, now {now}: {ROTATE}"
            )
        if min(entry.expires, keyring.expires) < now + ttl:
            log.warning(
                "release key or keyring expires before this release does (%d s); rotate soon", ttl
            )

    def rotate(self, *, now: int, lifetime: int = YEAR) -> CoordinatorKeys:
        """New release key; the old one is dropped from a new keyring version (revoked)."""
        root_path = self.home / "keys" / "root.json"
        if not root_path.exists():
            raise ConfigError(
                f"{root_path}: the root key is not here (moved offline?); put it back to rotate"
            )
        root = _load_key(root_path)
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
        old_key = self.home / "keys" / f"release-{self.release.keyid}.json"
        with os_errors(f"{old_key}: cannot remove the revoked key"):
            old_key.unlink(missing_ok=True)
        log.info("rotated release key: keyring v%d, release %s", keyring.version, release.keyid)
        return CoordinatorKeys(self.home, release, raw, sig)
