"""The candidate a device reports (``DeviceStatus.candidate``) through ingest into the registry:
``fleet.rows`` show it, ``fleet status`` prints it, ``wait_for(..., candidate=True)`` waits on
it (and ignores what the device runs as its active model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgefleet.coordinator import fleet
from edgefleet.coordinator.ingest import STATUS, Ingest
from edgefleet.protocol.messages import ActiveModel, CandidateModel, DeviceStatus

from edgefleet.cli import main

from .homes import T0, Home, make_home

BID = "ab" * 16


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


def report(h: Home, device: str, *, active: int, candidate: int | None,
           mode: str = "shadow", state: str = "idle") -> None:  # fmt: skip
    """A status as ``coordinator serve`` ingests it: active release ``active`` of m 1, and the
    candidate m 3 of sequence ``candidate`` (None: no candidate)."""
    cand = None if candidate is None else CandidateModel(
        name="m", version="3", sequence=candidate, bundle_id=BID, mode=mode)  # fmt: skip
    st = DeviceStatus(device_id=device, time=T0, state=state, candidate=cand,
                      active=ActiveModel(name="m", version="1", sequence=active, format="onnx",
                                         bundle_id=BID))  # fmt: skip
    ingest = Ingest(h.coordinator.registry, clock=lambda: T0)
    assert ingest.add(device, STATUS, st.encode())
    assert ingest.flush() == 1


def test_rows_show_the_candidate_each_device_reports(home: Home) -> None:
    report(home, "dev-a", active=1, candidate=4, mode="ab")
    report(home, "dev-b", active=1, candidate=None)
    rows = {r.device: r for r in fleet.rows(home.coordinator.registry, T0)}
    assert rows["dev-a"].candidate == {"name": "m", "version": "3", "sequence": 4,
                                       "bundle_id": BID, "mode": "ab"}  # fmt: skip
    assert rows["dev-a"].to_dict()["candidate"]["mode"] == "ab"
    assert rows["dev-b"].candidate is None and "candidate" not in rows["dev-b"].to_dict()
    assert rows["dev-a"].sequence == 1  # the active model is what it was
    report(home, "dev-a", active=1, candidate=None)  # dropped: the next status says so
    assert fleet.rows(home.coordinator.registry, T0)[0].candidate is None


def test_an_offline_will_keeps_the_last_reported_candidate(home: Home) -> None:
    report(home, "dev-a", active=1, candidate=4)
    ingest = Ingest(home.coordinator.registry, clock=lambda: T0)
    assert ingest.add("dev-a", STATUS, DeviceStatus(device_id="dev-a", time=T0,
                                                    state="offline").encode())  # fmt: skip
    ingest.flush()
    [row] = [r for r in fleet.rows(home.coordinator.registry, T0) if r.device == "dev-a"]
    assert row.state == "offline" and row.candidate is not None and row.candidate["sequence"] == 4


def test_fleet_status_prints_a_candidate_column_only_when_there_is_one(
    home: Home, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["fleet", "status", "--home", str(home.coordinator.home)]
    assert main(argv) == 0
    assert "candidate" not in capsys.readouterr().out
    report(home, "dev-a", active=1, candidate=4)
    assert main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "device" in line)
    assert "candidate" in header
    [a] = [line for line in out.splitlines() if line.strip().startswith("dev-a")]
    assert "shadow 4 (v3)" in a
    assert main([*argv, "--json"]) == 0
    doc = {r["device"]: r for r in json.loads(capsys.readouterr().out)}
    assert doc["dev-a"]["candidate"]["sequence"] == 4 and "candidate" not in doc["dev-b"]


class FakeTime:
    def __init__(self, actions: list[object]) -> None:
        self.now, self.actions = 1000.0, actions

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        action = self.actions.pop(0) if self.actions else None
        if callable(action):
            action()


def test_a_candidate_wait_waits_for_the_candidate_not_the_active_model(home: Home) -> None:
    seq = 10  # the candidate's release; the active one is far newer, and does not count
    fake = FakeTime([lambda: report(home, "dev-a", active=50, candidate=None),
                     lambda: report(home, "dev-a", active=50, candidate=seq),
                     lambda: report(home, "dev-b", active=50, candidate=seq + 1)])  # fmt: skip
    seen: list[list[fleet.TargetState]] = []
    result = fleet.wait_for(home.coordinator.registry, seq, ["dev-a", "dev-b"], 60, poll=0.5,
                            clock=fake.clock, sleep=fake.sleep, on_progress=seen.append,
                            candidate=True)  # fmt: skip
    assert result.ok and result.arrived == ("dev-a", "dev-b")
    assert [[s.arrived for s in states] for states in seen] == [
        [False, False], [False, False], [True, False], [True, True]]  # fmt: skip
    assert (seen[-1][0].sequence, seen[-1][0].version) == (seq, "3")
    plain = fleet.wait_for(home.coordinator.registry, 60, ["dev-a"], 1.0, poll=0.5,
                           clock=fake.clock, sleep=fake.sleep)  # fmt: skip
    assert not plain.ok  # an ordinary wait still reads the active model (release 50)


def test_a_candidate_wait_times_out_with_the_devices_that_lack_it(home: Home) -> None:
    report(home, "dev-a", active=1, candidate=9)
    fake = FakeTime([])
    result = fleet.wait_for(
        home.coordinator.registry,
        10,
        ["dev-a", "dev-b", "dev-x"],
        2.0,
        poll=1.0,
        clock=fake.clock,
        sleep=fake.sleep,
        candidate=True,
    )
    assert not result.ok and result.pending == ("dev-a", "dev-b", "dev-x")
