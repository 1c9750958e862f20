"""Provisioning a device: what ``edgefleet agent init`` does, callable from code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import atomic_write, private_dir
from edgefleet.protocol.keys import KEM_X25519

from .config import AgentConfig
from .identity import DeviceIdentity
from .trust import TrustStore

__all__ = ["provision"]


def provision(home: Path, device_id: str, root_public: bytes, *, kem: str = KEM_X25519,
              **config: Any) -> DeviceIdentity:
    """Make the device's keys, pin the coordinator's root key and write ``agent.toml``.

    Refuses a home that already has device keys: re-keying a device is a new enrollment.
    """
    if (home / "keys" / "device.json").exists():
        raise FileExistsError(f"{home}: already initialised (keys/device.json exists)")
    private_dir(home)  # 0700: keys, trust and decrypted models live inside
    cfg = AgentConfig(home=home, device_id=device_id, **config)  # validate before making keys
    identity = DeviceIdentity.create(home / "keys", device_id, kem=kem)
    TrustStore.pin(home / "trust", root_public)
    atomic_write(home / "agent.toml", cfg.to_toml().encode())
    return identity
