"""Upstream ingestion without a broker: decode, coalesce per device, store in batches, count."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator.ingest import STATUS, TELEMETRY, Ingest
from edgefleet.protocol.messages import (
    ActiveModel,
    DeviceStatus,
    DownloadProgress,
    InstallResult,
    Telemetry,
)

from .homes import T0, Home, make_home

BID = "ab" * 16


def status(device: str = "dev-a", *, state: str = "idle", sequence: int | None = 3,
           version: str = "1", result: InstallResult | None = None,
           progress: DownloadProgress | None = None) -> bytes:
    active = None if sequence is None else ActiveModel(
        name="m", version=version, sequence=sequence, format="onnx", bundle_id=BID)
    return DeviceStatus(device_id=device, time=T0, state=state, active=active,
                        last_result=result, progress=progress).encode()


def telemetry(device: str = "dev-a") -> bytes:
    return Telemetry(device_id=device, time=T0, metrics={"latency_ms": 1.5}).encode()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


@pytest.fixture
def ingest(home: Home) -> Ingest:
    return Ingest(home.coordinator.registry, clock=lambda: T0 + 100.7)


def test_a_status_sets_the_devices_columns(home: Home, ingest: Ingest) -> None:
    result = InstallResult(ok=False, code="integrity", reason="chunk 3", time=T0, sequence=4)
    progress = DownloadProgress(bundle_id=BID, sequence=4, done=10, total=20, fetched=1)
    assert ingest.add("dev-a", STATUS, status(result=result, progress=progress))
    assert ingest.pending == 1 and home.coordinator.registry.device("dev-a").state == "enrolled"
    assert ingest.flush() == 1
    d = home.coordinator.registry.device("dev-a")
    assert d is not None
    assert (d.state, d.active_name, d.active_version, d.active_sequence, d.last_seen) == (
        "idle", "m", "1", 3, T0 + 100)
    assert d.last_result == {
        "ok": False, "code": "integrity", "reason": "chunk 3", "time": T0, "sequence": 4,
        "progress": {"bundle_id": BID, "sequence": 4, "done": 10, "total": 20, "reused": 0,
                     "fetched": 1, "requests": 0, "rejected": 0}}
    assert (ingest.decoded, ingest.stored, ingest.statuses, ingest.dropped) == (1, 1, 1, 0)
    assert ingest.pending == 0 and ingest.flush() == 0  # nothing left to write


def test_a_status_without_a_model_clears_the_active_columns(home: Home, ingest: Ingest) -> None:
    ingest.add("dev-a", STATUS, status())
    ingest.flush()
    ingest.add("dev-a", STATUS, status(sequence=None, state="error"))
    ingest.flush()
    d = home.coordinator.registry.device("dev-a")
    assert d is not None
    assert (d.state, d.active_sequence, d.last_result) == ("error", None, {"progress": None})


def test_later_messages_win_within_a_batch(home: Home, ingest: Ingest) -> None:
    ingest.add("dev-a", STATUS, status(state="downloading", sequence=3))
    ingest.add("dev-b", STATUS, status("dev-b", sequence=3))
    ingest.add("dev-a", STATUS, status(state="idle", sequence=4, version="2"))
    ingest.add("dev-a", TELEMETRY, telemetry())  # only last_seen: the status columns stay
    assert ingest.pending == 2
    assert ingest.flush() == 2  # one write per device, not per message
    a = home.coordinator.registry.device("dev-a")
    assert a is not None and (a.state, a.active_sequence, a.active_version) == ("idle", 4, "2")
    assert (ingest.decoded, ingest.stored, ingest.statuses) == (4, 2, 2)


def test_telemetry_alone_is_a_sign_of_life_not_a_status(home: Home, ingest: Ingest) -> None:
    assert ingest.add("dev-b", TELEMETRY, telemetry("dev-b"))
    assert ingest.flush() == 0
    d = home.coordinator.registry.device("dev-b")
    assert d is not None and (d.last_seen, d.state) == (T0 + 100, "enrolled")
    assert ingest.stored == 1 and ingest.statuses == 0


@pytest.mark.parametrize(("payload", "why"), [
    (b"{not json", "malformed"),
    (b"x" * 100_000, "oversize"),
    (json.dumps({"type": "status", "schema_version": 1}).encode(), "missing fields"),
    (status().replace(b'"idle"', b'"dancing"'), "unknown state"),
    (status("dev-b"), "names another device"),
])
def test_bad_statuses_are_dropped_and_counted(home: Home, ingest: Ingest, payload: bytes,
                                              why: str) -> None:
    ingest.add("dev-a", STATUS, status())
    assert not ingest.add("dev-a", STATUS, payload), why
    assert (ingest.dropped, ingest.decoded, ingest.pending) == (1, 1, 1)
    ingest.flush()
    d = home.coordinator.registry.device("dev-a")
    assert d is not None and d.active_sequence == 3, "the good status still counts"
    b = home.coordinator.registry.device("dev-b")
    assert b is not None and b.state == "enrolled", "a misaddressed status changes nothing"


@pytest.mark.parametrize(("kind", "payload"), [
    (STATUS, b""),  # a cleared retained status
    ("up/chunkreq", b"{}"),  # not ours to ingest
])
def test_nothing_to_store_is_ignored_not_dropped(ingest: Ingest, kind: str,
                                                 payload: bytes) -> None:
    assert not ingest.add("dev-a", kind, payload)
    assert (ingest.ignored, ingest.dropped, ingest.pending) == (1, 0, 0)


def test_bad_telemetry_is_dropped(ingest: Ingest) -> None:
    assert not ingest.add("dev-a", TELEMETRY, b'{"type": "telemetry"}')
    assert ingest.dropped == 1 and ingest.pending == 0


def test_unenrolled_devices_are_counted_and_the_rest_stored(home: Home, ingest: Ingest) -> None:
    ingest.add("dev-x", STATUS, status("dev-x"))
    ingest.add("dev-a", STATUS, status())
    assert ingest.flush() == 1
    assert (ingest.unknown, ingest.stored) == (1, 1)
    assert home.coordinator.registry.device("dev-x") is None


def test_a_failing_batch_is_stored_device_by_device(home: Home, ingest: Ingest,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    registry = home.coordinator.registry
    real = registry.update_devices

    def refuse_batches(updates: dict[str, dict[str, Any]]) -> set[str]:
        if len(updates) > 1 or "dev-b" in updates:
            raise RuntimeError("database says no")
        return real(updates)

    def refuse_bulk(updates: dict[str, dict[str, Any]]) -> set[str]:
        raise RuntimeError("database says no to the batch")

    monkeypatch.setattr(ingest, "_bulk_update", refuse_bulk)  # the batch path
    monkeypatch.setattr(registry, "update_devices", refuse_batches)  # the one-by-one path
    ingest.add("dev-a", STATUS, status())
    ingest.add("dev-b", STATUS, status("dev-b"))
    assert ingest.flush() == 1
    a, b = registry.device("dev-a"), registry.device("dev-b")
    assert a is not None and a.active_sequence == 3
    assert b is not None and b.active_sequence is None
