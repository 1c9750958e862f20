"""The release keyring: root-signed list of release keys that may sign manifests.

The root key (which may live offline) signs the keyring; release keys sign manifests.
Rotating or revoking a release key means publishing a keyring with a higher ``version``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._fields import check_header, check_keys, field
from .canonical import b64d, b64e, canonical_json, decode_json_object
from .errors import DecodeError, UntrustedSignerError
from .keys import key_id

__all__ = ["KeyEntry", "Keyring", "Signature", "decode_keyring_file", "encode_keyring_file"]

MAX_KEYRING = 64 * 1024
MAX_SIGNATURE = 1024


@dataclass(frozen=True, kw_only=True)
class Signature:
    """A detached Ed25519 signature and the id of the key that made it."""

    keyid: str
    sig: bytes

    def __post_init__(self) -> None:
        if len(self.sig) != 64:
            raise DecodeError(f"signature: expected 64 bytes, saw {len(self.sig)}")

    def encode(self) -> bytes:
        return canonical_json({"keyid": self.keyid, "sig": b64e(self.sig)})

    @classmethod
    def decode(cls, data: bytes) -> Signature:
        d = decode_json_object(data, max_size=MAX_SIGNATURE, what="signature")
        check_keys(d, {"keyid", "sig"}, "signature")
        return cls(
            keyid=field(d, "keyid", str, "signature"), sig=b64d(d.get("sig"), what="signature.sig")
        )


@dataclass(frozen=True, kw_only=True)
class KeyEntry:
    keyid: str
    public: bytes
    expires: int  # unix seconds

    def __post_init__(self) -> None:
        if len(self.public) != 32 or key_id(self.public) != self.keyid:
            raise DecodeError(f"keyring key {self.keyid!r:.40}: id does not match its 32-byte key")

    def to_dict(self) -> dict[str, Any]:
        return {"keyid": self.keyid, "public": b64e(self.public), "expires": self.expires}

    @classmethod
    def from_dict(cls, d: object) -> KeyEntry:
        if not isinstance(d, dict):
            raise DecodeError("keyring key: expected an object")
        check_keys(d, {"keyid", "public", "expires"}, "keyring key")
        return cls(
            keyid=field(d, "keyid", str, "keyring key"),
            public=b64d(d.get("public"), what="keyring key.public", max_len=64),
            expires=field(d, "expires", int, "keyring key"),
        )


@dataclass(frozen=True, kw_only=True)
class Keyring:
    version: int
    expires: int  # unix seconds
    root_keyid: str
    keys: tuple[KeyEntry, ...]
    type: str = "keyring"
    schema_version: int = 1

    def __post_init__(self) -> None:
        if self.version < 1:
            raise DecodeError(f"keyring.version: expected >= 1, saw {self.version}")
        if len({k.keyid for k in self.keys}) != len(self.keys):
            raise DecodeError("keyring: duplicate key ids")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "schema_version": self.schema_version,
            "version": self.version,
            "expires": self.expires,
            "root_keyid": self.root_keyid,
            "keys": [k.to_dict() for k in self.keys],
        }

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> Keyring:
        d = decode_json_object(data, max_size=MAX_KEYRING, what="keyring")
        check_header(d, "keyring", 1, "keyring")
        check_keys(
            d, {"type", "schema_version", "version", "expires", "root_keyid", "keys"}, "keyring"
        )
        keys = field(d, "keys", list, "keyring")
        if len(keys) > 64:
            raise DecodeError(f"keyring: expected at most 64 keys, saw {len(keys)}")
        return cls(
            version=field(d, "version", int, "keyring"),
            expires=field(d, "expires", int, "keyring"),
            root_keyid=field(d, "root_keyid", str, "keyring"),
            keys=tuple(KeyEntry.from_dict(k) for k in keys),
        )

    def release_key(self, keyid: str, now: int) -> KeyEntry:
        """The unexpired release key ``keyid``, or ``UntrustedSignerError``."""
        for entry in self.keys:
            if entry.keyid == keyid:
                if now >= entry.expires:
                    raise UntrustedSignerError(
                        f"release key {keyid}: expired at {entry.expires}, now {now}"
                    )
                return entry
        raise UntrustedSignerError(
            f"release key {keyid!r:.40}: not in keyring v{self.version} "
            f"(trusted: {[k.keyid for k in self.keys]})"
        )


#: bytes: a stored keyring file (the keyring and its root signature, base64, in one object)
MAX_KEYRING_FILE = 2 * (MAX_KEYRING + MAX_SIGNATURE)


def encode_keyring_file(raw: bytes, sig: bytes) -> bytes:
    """``keyring.json`` as the agent's trust store and the coordinator keep it: the keyring
    bytes as signed and the root's signature over them (verified again whenever loaded)."""
    return canonical_json({"keyring": b64e(raw), "signature": b64e(sig)})


def decode_keyring_file(data: bytes, what: str = "keyring file") -> tuple[bytes, bytes]:
    """``(keyring bytes, signature bytes)`` of a stored keyring file; ``DecodeError`` if it
    is not one (the signature is NOT checked here: callers verify against their root)."""
    doc = decode_json_object(data, max_size=MAX_KEYRING_FILE, what=what)
    check_keys(doc, {"keyring", "signature"}, what)
    raw = b64d(field(doc, "keyring", str, what), what=f"{what}: keyring", max_len=MAX_KEYRING)
    sig = b64d(field(doc, "signature", str, what), what=f"{what}: signature",
               max_len=MAX_SIGNATURE)  # fmt: skip
    return raw, sig
