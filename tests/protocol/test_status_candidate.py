"""``DeviceStatus.candidate`` (the shadow / A/B candidate a device serves): optional and backwards
compatible (absent or null = none; encoded only when set, so a status without one is the same
bytes as before), strictly typed and bounded when present."""

from __future__ import annotations

import json
from typing import Any

import pytest
from edgefleet.protocol.errors import DecodeError, TooLargeError
from edgefleet.protocol.messages import MAX_STATUS, ActiveModel, CandidateModel, DeviceStatus

BASE: dict[str, Any] = {
    "type": "status", "schema_version": 1, "device_id": "dev-a", "time": 1, "state": "idle",
    "active": None, "highest_sequence": 0, "last_result": None, "progress": None, "counter": 1,
}  # fmt: skip
CANDIDATE: dict[str, Any] = {"name": "digits", "version": "3", "sequence": 7,
                             "bundle_id": "ab" * 16, "mode": "shadow"}  # fmt: skip


def decode(**changes: Any) -> DeviceStatus:
    return DeviceStatus.decode(json.dumps({**BASE, **changes}).encode())


def test_a_status_without_a_candidate_is_what_it_was() -> None:
    st = decode()
    assert st.candidate is None and decode(candidate=None).candidate is None
    assert st.encode() == json.dumps(BASE, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("mode", ["shadow", "ab"])
def test_a_candidate_round_trips(mode: str) -> None:
    active = ActiveModel(name="digits", version="1", sequence=3, format="onnx", bundle_id="cd" * 16)
    st = DeviceStatus(device_id="dev-a", time=1, state="idle", active=active,
                      candidate=CandidateModel(**{**CANDIDATE, "mode": mode}))  # fmt: skip
    assert DeviceStatus.decode(st.encode()) == st
    assert json.loads(st.encode())["candidate"] == {**CANDIDATE, "mode": mode}


def test_unknown_fields_of_a_newer_agent_are_dropped() -> None:
    st = decode(candidate={**CANDIDATE, "share": 0.1, "future": [1]})
    assert st.candidate == CandidateModel(**CANDIDATE)


@pytest.mark.parametrize("candidate", [
    "digits@3", [CANDIDATE], {**CANDIDATE, "mode": "active"}, {**CANDIDATE, "mode": None},
    {**CANDIDATE, "name": "a b"}, {**CANDIDATE, "version": ""}, {**CANDIDATE, "sequence": -1},
    {**CANDIDATE, "sequence": True}, {**CANDIDATE, "sequence": 2**63},
    {**CANDIDATE, "bundle_id": 5}, {k: v for k, v in CANDIDATE.items() if k != "mode"},
], ids=lambda c: json.dumps(c)[:40])  # fmt: skip
def test_malformed_candidates_are_refused(candidate: Any) -> None:
    with pytest.raises(DecodeError, match="status.candidate"):
        decode(candidate=candidate)


def test_long_text_is_cut_and_the_status_stays_bounded() -> None:
    st = decode(candidate={**CANDIDATE, "bundle_id": "x" * 5000})
    assert st.candidate is not None and len(st.candidate.bundle_id) == 64
    with pytest.raises(TooLargeError):  # the whole status is size-checked before parsing
        decode(candidate={**CANDIDATE, "bundle_id": "x" * MAX_STATUS})


def test_the_constructor_checks_the_mode() -> None:
    with pytest.raises(DecodeError, match="status.candidate.mode"):
        CandidateModel(**{**CANDIDATE, "mode": "canary"})
