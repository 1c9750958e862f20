"""MQTT topic names (prefix ``ef/v1``) and their parsing. Pure.

Each device lives in its own subtree, so a mosquitto ACL ``pattern`` with ``%u`` (the device
id is the broker username) confines it: it reads ``release``, ``chunk`` and ``cmd`` and writes
only under ``up/``.
"""

from __future__ import annotations

from ._fields import NAME_RE

__all__ = [
    "PREFIX",
    "SHARE_GROUP",
    "chunk",
    "chunk_requests_shared",
    "cmd",
    "device_of",
    "release",
    "up",
]

PREFIX = "ef/v1"
SHARE_GROUP = "edgefleet-coord"


def _dev(device_id: str) -> str:
    if not NAME_RE.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must match {NAME_RE.pattern}")
    return f"{PREFIX}/dev/{device_id}"


def release(device_id: str) -> str:
    """Retained: the device's current release offer (manifest, signature, keyring, envelope)."""
    return f"{_dev(device_id)}/release"


def chunk(device_id: str) -> str:
    """Chunk replies for this device."""
    return f"{_dev(device_id)}/chunk"


def cmd(device_id: str) -> str:
    return f"{_dev(device_id)}/cmd"


def up(device_id: str, kind: str) -> str:
    """Device -> coordinator: ``status`` (retained), ``chunkreq``, ``telemetry``."""
    if kind not in ("status", "chunkreq", "telemetry"):
        raise ValueError(f"unknown upstream kind {kind!r}")
    return f"{_dev(device_id)}/up/{kind}"


def up_all(kind: str) -> str:
    return f"{PREFIX}/dev/+/up/{kind}"


def chunk_requests_shared() -> str:
    """What coordinators subscribe to so that they share the chunk load."""
    return f"$share/{SHARE_GROUP}/{up_all('chunkreq')}"


def device_of(topic: str) -> tuple[str, str] | None:
    """``(device_id, rest)`` for a topic under ``ef/v1/dev/<id>/``, else ``None``."""
    parts = topic.split("/", 4)
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "dev":
        return None
    if not NAME_RE.fullmatch(parts[3]):
        return None
    return parts[3], parts[4]
