"""A device's public identity, as the coordinator stores it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._fields import name as check_name
from .canonical import b64d, b64e, canonical_json, decode_json_object
from .errors import DecodeError
from .keys import KemPublicKey

__all__ = ["DevicePublic"]


@dataclass(frozen=True, kw_only=True)
class DevicePublic:
    """What the coordinator stores about a device's keys."""

    device_id: str
    sign_public: bytes
    kem: KemPublicKey

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "device-public",
            "device_id": self.device_id,
            "sign_public": b64e(self.sign_public),
            "kem": self.kem.kem,
            "kem_public": b64e(self.kem.raw),
        }

    @classmethod
    def from_dict(cls, d: Any) -> DevicePublic:
        if not isinstance(d, dict) or d.get("type") != "device-public":
            raise DecodeError("device public key file: expected type 'device-public'")
        sign = b64d(d.get("sign_public"), what="sign_public", max_len=32)
        if len(sign) != 32:
            raise DecodeError("sign_public: expected 32 bytes")
        return cls(
            device_id=check_name(d.get("device_id"), "device_id"),
            sign_public=sign,
            kem=KemPublicKey(
                str(d.get("kem")), b64d(d.get("kem_public"), what="kem_public", max_len=4096)
            ),
        )

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> DevicePublic:
        return cls.from_dict(decode_json_object(data, max_size=16384, what="device public key"))
