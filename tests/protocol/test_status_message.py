"""Device status is untrusted input that ends up in database columns: every field is typed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.messages import (
    ActiveModel,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    Telemetry,
)

GOOD: dict[str, Any] = {
    "type": "status", "schema_version": 1, "device_id": "dev-a", "time": 1, "state": "idle",
    "active": {"name": "digits", "version": "1", "sequence": 3, "format": "onnx",
               "bundle_id": "ab" * 16},
    "highest_sequence": 3, "counter": 7,
    "last_result": {"ok": True, "code": "ok", "reason": "", "sequence": 3, "time": 5},
    "progress": {"bundle_id": "ab" * 16, "sequence": 3, "done": 10, "total": 20, "reused": 0,
                 "fetched": 1, "requests": 1, "rejected": 0},
}


def decode(**changes: Any) -> DeviceStatus:
    doc = {**GOOD, **changes}
    return DeviceStatus.decode(json.dumps(doc).encode())


def test_good_status_round_trips() -> None:
    st = decode()
    assert DeviceStatus.decode(st.encode()) == st


@pytest.mark.parametrize("changes", [
    {"active": {"name": {}}},
    {"active": {"name": "digits", "sequence": "abc"}},
    {"active": {"sequence": 1 << 63}},
    {"active": {"sequence": -1}},
    {"active": {"sequence": True}},
    {"last_result": {"reason": 5}},
    {"last_result": {"ok": "yes"}},
    {"progress": {"done": 1.5}},
    {"progress": []},
    {"active": {"name": "digits"}},  # required fields missing
    {"last_result": {"reason": "no ok, no code"}},
    {"progress": {"done": 1}},
    {"time": 1 << 64},
    {"highest_sequence": "3"},
    {"counter": -2},
], ids=lambda c: json.dumps(c)[:40])
def test_mistyped_fields_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(**changes)


def test_free_text_is_cut_and_unknown_fields_dropped() -> None:
    st = decode(last_result={"ok": False, "code": "x" * 100, "reason": "r" * 10_000, "evil": {}})
    assert st.last_result == InstallResult(ok=False, code="x" * 32, reason="r" * 500)


def test_fields_decode_into_typed_objects() -> None:
    st = decode()
    assert st.active == ActiveModel(
        name="digits", version="1", sequence=3, format="onnx", bundle_id="ab" * 16
    )
    assert st.last_result == InstallResult(ok=True, code="ok", reason="", sequence=3, time=5)
    assert st.progress == DownloadProgress(
        bundle_id="ab" * 16, sequence=3, done=10, total=20, fetched=1, requests=1
    )
    wire = json.loads(st.encode())
    assert wire["active"] == GOOD["active"] and wire["progress"] == GOOD["progress"]


def test_null_sub_objects_stay_none() -> None:
    st = decode(active=None, last_result=None, progress=None)
    assert (st.active, st.last_result, st.progress) == (None, None, None)


TELEMETRY: dict[str, Any] = {
    "type": "telemetry", "schema_version": 1, "device_id": "dev-a", "time": 1,
    "metrics": {"state": "idle", "dropped": 0, "download": None, "lat": [0.1, 2]},
}


def test_telemetry_round_trips() -> None:
    t = Telemetry.decode(json.dumps(TELEMETRY).encode())
    assert Telemetry.decode(t.encode()) == t and t.metrics["lat"] == [0.1, 2]


def _deep(n: int) -> Any:
    return {"a": _deep(n - 1)} if n else 1


@pytest.mark.parametrize("changes", [
    {"device_id": "../etc"},
    {"device_id": 5},
    {"time": -1},
    {"time": True},
    {"metrics": []},
    {"metrics": {"x": float("inf")}},
    {"metrics": {"x": _deep(6)}},
    {"metrics": {"k" * 65: 1}},
    {"metrics": {"x": "v" * 501}},
    {"metrics": {"x": list(range(2000))}},
    {"extra": 1},
], ids=lambda c: json.dumps(c, default=str)[:40])
def test_malformed_telemetry_is_refused(changes: dict[str, Any]) -> None:
    doc = json.dumps({**TELEMETRY, **changes}, allow_nan=True).encode()
    with pytest.raises(DecodeError):
        Telemetry.decode(doc)


def test_telemetry_is_validated_when_built_too() -> None:
    with pytest.raises(DecodeError):
        Telemetry(device_id="dev-a", time=1, metrics={"x": float("nan")})
