"""Fleet views: rows with desired vs actual, and waiting for a sequence on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.coordinator import fleet
from edgefleet.coordinator.fleet import FleetRow, TargetState

from .homes import T0, Home, make_home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


def run(home: Home, device: str, sequence: int, version: str, **values: object) -> None:
    assert home.coordinator.registry.update_device(
        device, active_name="m", active_version=version, active_sequence=sequence, **values)


def by_device(home: Home, now: int = T0) -> dict[str, FleetRow]:
    return {r.device: r for r in fleet.rows(home.coordinator.registry, now)}


def test_rows_before_any_release(home: Home) -> None:
    home.coordinator.registry.add_to_group("lab", ["dev-a", "dev-c"])
    rows = fleet.rows(home.coordinator.registry, T0)
    assert [r.device for r in rows] == ["dev-a", "dev-b", "dev-c"]
    a = rows[0]
    assert a == FleetRow(device="dev-a", groups=("lab",), state="enrolled", model=None,
                         version=None, sequence=None, last_seen_s=None, last_result=None,
                         desired_sequence=None, desired_version=None, revoked=False)
    assert a.in_sync


def test_desired_is_the_newest_release_targeting_each_device(home: Home) -> None:
    first = home.build("1", "all")
    second = home.build("2", "dev-a,dev-b")
    third = home.build("1", "dev-b")  # an operator's rollback is a new, higher sequence
    rows = by_device(home)
    assert (rows["dev-a"].desired_sequence, rows["dev-a"].desired_version) == (
        second.sequence, "2")
    assert (rows["dev-b"].desired_sequence, rows["dev-b"].desired_version) == (
        third.sequence, "1")
    assert (rows["dev-c"].desired_sequence, rows["dev-c"].desired_version) == (
        first.sequence, "1")
    assert not any(r.in_sync for r in rows.values())

    run(home, "dev-a", second.sequence, "2")
    run(home, "dev-c", first.sequence, "1")
    rows = by_device(home)
    assert rows["dev-a"].in_sync and rows["dev-c"].in_sync and not rows["dev-b"].in_sync
    assert (rows["dev-a"].model, rows["dev-a"].version, rows["dev-a"].sequence) == (
        "m", "2", second.sequence)


@pytest.mark.parametrize(("last_result", "shown"), [
    ({}, None),
    ({"ok": True, "code": "ok", "reason": ""}, "ok"),
    ({"ok": False, "code": "integrity", "reason": "r" * 100}, "integrity: " + "r" * 60),
    ({"ok": False, "code": "rollback"}, "rollback: "),
])
def test_last_result_text(home: Home, last_result: dict[str, object], shown: str | None) -> None:
    home.coordinator.registry.update_device("dev-a", last_result=last_result)
    assert by_device(home)["dev-a"].last_result == shown


def test_last_seen_and_revoked(home: Home) -> None:
    home.coordinator.registry.update_device("dev-a", last_seen=T0 - 42, state="idle")
    home.coordinator.revoke("dev-b")
    rows = by_device(home)
    assert (rows["dev-a"].last_seen_s, rows["dev-a"].state) == (42, "idle")
    assert rows["dev-b"].revoked and not rows["dev-a"].revoked


def test_to_dict_keeps_the_original_keys_first(home: Home) -> None:
    d = by_device(home)["dev-a"].to_dict()
    assert list(d)[:8] == ["device", "groups", "state", "model", "version", "sequence",
                           "last_seen_s", "last_result"]
    assert list(d)[8:] == ["desired_sequence", "desired_version", "revoked"]
    assert d["groups"] == []


class FakeTime:
    """A clock that moves only when the code under test sleeps; ``on_sleep`` runs then."""

    def __init__(self, on_sleep: list[object] | None = None) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.actions = list(on_sleep or [])

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.actions:
            action = self.actions.pop(0)
            if callable(action):
                action()


def test_wait_for_returns_once_every_target_runs_the_sequence(home: Home) -> None:
    release = home.build("1", "dev-a,dev-b")
    seq = release.sequence
    fake = FakeTime([lambda: run(home, "dev-a", seq, "1"), None,
                     lambda: run(home, "dev-b", seq + 5, "2")])  # newer counts too
    seen: list[list[TargetState]] = []
    result = fleet.wait_for(home.coordinator.registry, seq, ["dev-a", "dev-b"], 60, poll=0.5,
                            clock=fake.clock, sleep=fake.sleep, on_progress=seen.append)
    assert result.ok and result.arrived == ("dev-a", "dev-b") and result.pending == ()
    assert fake.sleeps == [0.5, 0.5, 0.5]
    assert [[s.arrived for s in states] for states in seen] == [
        [False, False], [True, False], [True, False], [True, True]]


def test_wait_for_times_out_with_whoever_is_pending(home: Home) -> None:
    seq = home.build("1", "all").sequence
    run(home, "dev-a", seq, "1")
    run(home, "dev-b", seq - 1, "1")
    fake = FakeTime()
    result = fleet.wait_for(home.coordinator.registry, seq, ["dev-a", "dev-b", "dev-x"], 2.0,
                            poll=0.75, clock=fake.clock, sleep=fake.sleep)
    assert not result.ok
    assert result.arrived == ("dev-a",) and result.pending == ("dev-b", "dev-x")
    assert fake.sleeps == [0.75, 0.75, 0.5]  # the last sleep ends at the deadline


def test_progress_reports_download_bytes_and_unknown_devices(home: Home) -> None:
    home.coordinator.registry.update_device(
        "dev-a", state="downloading", last_result={"progress": {"done": 5, "total": 20}})
    states = fleet.targets_state(home.coordinator.registry, 1, ["dev-a", "dev-x"])
    assert states == [
        TargetState(device_id="dev-a", state="downloading", sequence=None, version=None,
                    done=5, total=20, arrived=False),
        TargetState(device_id="dev-x", state="unknown", sequence=None, version=None,
                    done=None, total=None, arrived=False),
    ]
