"""Device status is untrusted input that ends up in database columns: every field is typed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.messages import DeviceStatus

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
    {"time": 1 << 64},
    {"highest_sequence": "3"},
    {"counter": -2},
], ids=lambda c: json.dumps(c)[:40])
def test_mistyped_fields_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode(**changes)


def test_free_text_is_cut_and_unknown_fields_dropped() -> None:
    st = decode(last_result={"ok": False, "code": "x" * 100, "reason": "r" * 10_000, "evil": {}})
    assert st.last_result == {"ok": False, "code": "x" * 32, "reason": "r" * 500}
