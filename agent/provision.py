"""Provisioning a device: what ``edgefleet agent init`` does, callable from code."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import atomic_write, private_dir
from edgefleet.protocol._fields import name as check_name
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.keys import KEM_X25519

from .config import AgentConfig
from .identity import DeviceIdentity
from .trust import TrustStore

__all__ = ["provision"]

_MADE = ("keys", "trust", "agent.toml")  # what provisioning puts into a home


def provision(home: Path, device_id: str, root_public: bytes, *, kem: str = KEM_X25519,
              **config: Any) -> DeviceIdentity:
    """Make the device's keys, pin the coordinator's root key and write ``agent.toml``.

    Refuses a home that already has device keys: re-keying a device is a new enrollment.
    Arguments are checked before anything is written (``ValueError``); if a later step
    fails, what this call made is removed again, so a rejected init leaves no half home.
    """
    if (home / "keys" / "device.json").exists():
        raise FileExistsError(f"{home}: already initialised (keys/device.json exists)")
    try:
        check_name(device_id, "device id")
    except DecodeError as exc:  # the operator's argument, not received input
        raise ValueError(str(exc)) from exc
    cfg = AgentConfig(home=home, device_id=device_id, **config)  # validate before making keys
    top = _first_missing(home)
    fresh = [home / n for n in _MADE if not (home / n).exists()]
    try:
        private_dir(home)  # 0700: keys, trust and decrypted models live inside
        identity = DeviceIdentity.create(home / "keys", device_id, kem=kem)
        TrustStore.pin(home / "trust", root_public)
        atomic_write(home / "agent.toml", cfg.to_toml().encode())
    except BaseException:
        _undo(top, fresh)
        raise
    return identity


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (None: it exists)."""
    top = None
    p = path
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    return top


def _undo(top: Path | None, fresh: list[Path]) -> None:
    with contextlib.suppress(OSError):  # the error being raised matters more
        if top is not None:
            shutil.rmtree(top)
            return
        for p in fresh:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
