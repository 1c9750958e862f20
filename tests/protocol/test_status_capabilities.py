"""``DeviceStatus.capabilities`` (``fl``: opted in to federated rounds): optional and
backwards compatible (absent = none; an empty list is not sent), strictly typed when present."""

from __future__ import annotations

import json
from typing import Any

import pytest
from edgefleet.protocol.errors import DecodeError
from edgefleet.protocol.messages import DeviceStatus

BASE: dict[str, Any] = {
    "type": "status", "schema_version": 1, "device_id": "dev-a", "time": 1, "state": "idle",
    "active": None, "highest_sequence": 0, "last_result": None, "progress": None, "counter": 1,
}  # fmt: skip


def decode(**changes: Any) -> DeviceStatus:
    return DeviceStatus.decode(json.dumps({**BASE, **changes}).encode())


def test_a_status_without_the_field_has_no_capabilities() -> None:
    st = decode()
    assert st.capabilities == () and DeviceStatus.FL not in st.capabilities
    assert "capabilities" not in json.loads(st.encode())  # what an older coordinator accepts


def test_capabilities_round_trip() -> None:
    st = DeviceStatus(device_id="dev-a", time=1, state="idle", capabilities=("fl", "x-1"))
    assert DeviceStatus.decode(st.encode()) == st
    assert json.loads(st.encode())["capabilities"] == ["fl", "x-1"]
    assert decode(capabilities=[]).capabilities == ()


@pytest.mark.parametrize("caps", [
    "fl", {"fl": True}, [1], [None], [""], ["fl", "fl"], ["x", "fl"], ["a b"], ["f" * 65],
    [f"c{i:02d}" for i in range(17)], True,
], ids=lambda c: json.dumps(c)[:30])  # fmt: skip
def test_malformed_capabilities_are_refused(caps: Any) -> None:
    with pytest.raises(DecodeError, match="status.capabilities"):
        decode(capabilities=caps)


def test_the_constructor_checks_them_too() -> None:
    with pytest.raises(DecodeError):
        DeviceStatus(device_id="dev-a", time=1, state="idle", capabilities=["fl"])  # type: ignore[arg-type]
