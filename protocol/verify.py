"""Sans-I/O verification of keyrings, manifests and envelopes, in TUF's order.

Each function takes bytes as received plus trusted state and a clock value, and returns the
decoded, verified object or raises a ``BundleError`` subclass. Nothing here reads files,
sleeps or looks at the wall clock; the agent's updater carries out the I/O.

Order for a release: size cap -> signature over the bytes as received -> signer in the
keyring and unexpired -> decode -> sequence strictly above the last accepted -> expiry (with
the offline grace) -> this device is a target -> its envelope matches the signed digest.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .envelope import Envelope
from .errors import (
    ExpiredError,
    IntegrityError,
    KeyringError,
    NotForMeError,
    RollbackError,
    SignatureError,
    TooLargeError,
    UntrustedSignerError,
)
from .keyring import MAX_KEYRING, Keyring, Signature
from .keys import key_id, verify_signature
from .manifest import MAX_MANIFEST, Manifest

__all__ = [
    "Policy",
    "check_envelopes",
    "select_envelope",
    "verify_keyring",
    "verify_keyring_signature",
    "verify_manifest",
]


@dataclass(frozen=True, kw_only=True)
class Policy:
    offline_grace: int = 0  # seconds a manifest stays acceptable past its expiry


def verify_keyring(
    root_public: bytes, raw: bytes, sig_raw: bytes, *, now: int, current: Keyring | None
) -> Keyring:
    """Return the keyring to trust: ``raw`` if newer and valid, else ``current``."""
    keyring = verify_keyring_signature(root_public, raw, sig_raw)
    if current is not None and keyring.version < current.version:
        return current  # an older, genuine keyring: keep the newer one we trust
    if current is not None and keyring.version == current.version and keyring != current:
        raise KeyringError(
            f"keyring v{keyring.version}: differs from the trusted keyring of the same version"
        )
    if now >= keyring.expires:
        raise KeyringError(f"keyring v{keyring.version}: expired at {keyring.expires}, now {now}")
    return keyring


def verify_keyring_signature(root_public: bytes, raw: bytes, sig_raw: bytes) -> Keyring:
    """The keyring in ``raw`` if the pinned root signed exactly these bytes (no clock, no
    version rules: ``verify_keyring`` adds those). Trusted state read back from disk is
    re-verified with this, as python-tuf re-verifies the metadata it loads."""
    if len(raw) > MAX_KEYRING:
        raise TooLargeError(f"keyring: expected at most {MAX_KEYRING} bytes, saw {len(raw)}")
    sig = Signature.decode(sig_raw)
    if sig.keyid != key_id(root_public):
        raise UntrustedSignerError(
            f"keyring: expected root key {key_id(root_public)}, signed by {sig.keyid!r:.40}"
        )
    try:
        verify_signature(root_public, sig.sig, raw, what="keyring")
    except SignatureError as exc:
        raise KeyringError(str(exc)) from exc
    keyring = Keyring.decode(raw)
    if keyring.root_keyid != sig.keyid:
        raise KeyringError(f"keyring: names root {keyring.root_keyid!r:.40}, signed by {sig.keyid}")
    return keyring


def verify_manifest(
    keyring: Keyring,
    raw: bytes,
    sig_raw: bytes,
    *,
    now: int,
    device_id: str,
    highest_sequence: int,
    policy: Policy = Policy(),
) -> Manifest:
    """Verify ``raw`` (manifest bytes as received) and return the decoded manifest."""
    if len(raw) > MAX_MANIFEST:
        raise TooLargeError(f"manifest: expected at most {MAX_MANIFEST} bytes, saw {len(raw)}")
    sig = Signature.decode(sig_raw)
    if now >= keyring.expires:
        raise KeyringError(f"keyring v{keyring.version}: expired at {keyring.expires}, now {now}")
    entry = keyring.release_key(sig.keyid, now)
    verify_signature(entry.public, sig.sig, raw, what="manifest")
    manifest = Manifest.decode(raw)
    if manifest.sequence <= highest_sequence:
        raise RollbackError(
            f"release sequence: expected > {highest_sequence}, saw {manifest.sequence}"
        )
    if now > manifest.expires + policy.offline_grace:
        raise ExpiredError(
            f"manifest: expired at {manifest.expires} (+{policy.offline_grace}s grace), now {now}"
        )
    if device_id not in manifest.targets:
        raise NotForMeError(f"release {manifest.sequence}: device {device_id!r} is not a target")
    return manifest


def select_envelope(manifest: Manifest, envelopes: Iterable[Envelope], device_id: str) -> Envelope:
    """This device's envelope, checked against the digest the manifest signs."""
    for env in envelopes:
        if env.device_id == device_id:
            if env.digest != manifest.targets[device_id]:
                raise IntegrityError(
                    f"envelope for {device_id}: digest does not match the manifest"
                )
            return env
    raise NotForMeError(f"release {manifest.sequence}: no envelope for device {device_id!r}")


def check_envelopes(manifest: Manifest, envelopes: Iterable[Envelope]) -> None:
    """Every envelope present must be a target's and match its signed digest."""
    for env in envelopes:
        want = manifest.targets.get(env.device_id)
        if want is None:
            raise IntegrityError(f"envelope for {env.device_id!r}: not a target of this release")
        if env.digest != want:
            raise IntegrityError(
                f"envelope for {env.device_id}: digest does not match the manifest"
            )
