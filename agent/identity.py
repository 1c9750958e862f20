"""The device identity: its own key pairs, made on the device at enrollment.

``keys/device.json`` (mode 0600) holds the private keys; ``keys/device.pub.json`` the public
ones, which the operator hands to the coordinator (``edgefleet coordinator enroll``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol._fields import name as check_name
from edgefleet.protocol.canonical import b64d, b64e, canonical_json
from edgefleet.protocol.device import DevicePublic
from edgefleet.protocol.keys import KEM_X25519, KemPrivateKey, SigningKey, generate_kem_key

__all__ = ["DeviceIdentity", "DevicePublic"]


@dataclass(frozen=True, kw_only=True)
class DeviceIdentity:
    device_id: str
    signing: SigningKey
    kem: KemPrivateKey

    @classmethod
    def create(cls, keys_dir: Path, device_id: str, kem: str = KEM_X25519) -> DeviceIdentity:
        check_name(device_id, "device id")
        ident = cls(device_id=device_id, signing=SigningKey.generate(), kem=generate_kem_key(kem))
        keys_dir.mkdir(parents=True, exist_ok=True)
        private = {
            "device_id": device_id,
            "sign_seed": b64e(ident.signing.raw()),
            "kem": ident.kem.kem,
            "kem_private": b64e(ident.kem.raw),
        }
        atomic_write(keys_dir / "device.json", canonical_json(private), mode=0o600)
        atomic_write(keys_dir / "device.pub.json", ident.public().encode())
        return ident

    @classmethod
    def load(cls, keys_dir: Path) -> DeviceIdentity:
        d = json.loads((keys_dir / "device.json").read_bytes())
        return cls(
            device_id=d["device_id"],
            signing=SigningKey.from_raw(b64d(d["sign_seed"], what="sign_seed")),
            kem=KemPrivateKey(d["kem"], b64d(d["kem_private"], what="kem_private")),
        )

    def public(self) -> DevicePublic:
        return DevicePublic(
            device_id=self.device_id, sign_public=self.signing.public_raw, kem=self.kem.public()
        )
