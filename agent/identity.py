"""The device identity: its own key pairs, made on the device at enrollment.

``keys/device.json`` (mode 0600) holds the private keys; ``keys/device.pub.json`` the public
ones, which the operator hands to the coordinator (``edgefleet coordinator enroll``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write, os_errors, private_dir
from edgefleet.protocol._fields import check_keys, field
from edgefleet.protocol._fields import name as check_name
from edgefleet.protocol.canonical import b64d, b64e, canonical_json, decode_json_object
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.errors import BundleError, CorruptStateError
from edgefleet.protocol.keys import KEM_X25519, KemPrivateKey, SigningKey, generate_kem_key

__all__ = ["DeviceIdentity", "DevicePublic"]

PRIVATE = "device.json"
MAX_PRIVATE = 64 * 1024  # bytes; a hybrid KEM private key is ~3 KiB of base64


@dataclass(frozen=True, kw_only=True)
class DeviceIdentity:
    device_id: str
    signing: SigningKey
    kem: KemPrivateKey

    @classmethod
    def create(cls, keys_dir: Path, device_id: str, kem: str = KEM_X25519) -> DeviceIdentity:
        check_name(device_id, "device id")
        ident = cls(device_id=device_id, signing=SigningKey.generate(), kem=generate_kem_key(kem))
        private = {
            "device_id": device_id,
            "sign_seed": b64e(ident.signing.raw()),
            "kem": ident.kem.kem,
            "kem_private": b64e(ident.kem.raw),
        }
        with os_errors(f"{keys_dir}: cannot save the device keys"):
            private_dir(keys_dir)  # 0700, whatever the umask
            atomic_write(keys_dir / PRIVATE, canonical_json(private), mode=0o600)
            atomic_write(keys_dir / "device.pub.json", ident.public().encode())
        return ident

    @classmethod
    def load(cls, keys_dir: Path) -> DeviceIdentity:
        """The identity in ``keys_dir``: ``StoreError`` if unreadable, ``CorruptStateError``
        if it is not a device key file as ``create`` writes it."""
        path = keys_dir / PRIVATE
        with os_errors(f"{path}: cannot read the device keys"):
            data = path.read_bytes()
        what = "device keys"
        try:
            d = decode_json_object(data, max_size=MAX_PRIVATE, what=what)
            check_keys(d, {"device_id", "sign_seed", "kem", "kem_private"}, what)
            return cls(
                device_id=check_name(field(d, "device_id", str, what), "device id"),
                signing=SigningKey.from_raw(b64d(d.get("sign_seed"), what="sign_seed")),
                kem=KemPrivateKey(
                    field(d, "kem", str, what), b64d(d.get("kem_private"), what="kem_private")
                ),
            )
        except (BundleError, ValueError) as exc:  # ValueError: a key of the wrong size or kind
            raise CorruptStateError(f"{path}: not a device key file ({exc})") from exc

    def public(self) -> DevicePublic:
        return DevicePublic(
            device_id=self.device_id, sign_public=self.signing.public_raw, kem=self.kem.public()
        )
