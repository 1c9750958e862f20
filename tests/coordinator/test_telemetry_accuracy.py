"""Accuracy per version from the labels that flowed back: ``labelled``/``correct`` of the
agents' ``inference`` windows are summed by ``version_health`` (ingested without a broker);
windows without labels, and a device's malformed counts, give no accuracy rather than a
wrong one; the rollout evidence adapter passes it to the controller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator import telemetry
from edgefleet.coordinator.ingest import STATUS, TELEMETRY, Ingest
from edgefleet.coordinator.rollout import Gate, RolloutSpec, RolloutState, Stage
from edgefleet.coordinator.rollouts import Rollout, TelemetryEvidence
from edgefleet.protocol.messages import ActiveModel, DeviceStatus, Telemetry

from .homes import T0, Home, make_home

BID = "ab" * 16


def window(count: int, labelled: Any = None, correct: Any = None) -> dict[str, Any]:
    w: dict[str, Any] = {"count": count, "errors": 0, "rows": count, "lat": [0, count],
                         "classes": {"1": count}}  # fmt: skip
    if labelled is not None:
        w |= {"labelled": labelled, "correct": correct}
    return w


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


def ingest(home: Home, *messages: tuple[str, int, dict[str, Any]]) -> None:
    ing = Ingest(home.coordinator.registry, clock=lambda: T0 + 1000)
    for dev in {d for d, _, _ in messages}:
        active = ActiveModel(name="m", version="2", sequence=3, format="onnx", bundle_id=BID)
        ing.add(dev, STATUS, DeviceStatus(device_id=dev, time=T0, state="idle",
                                          active=active).encode())  # fmt: skip
    for dev, t, inference in messages:
        ing.add(dev, TELEMETRY, Telemetry(device_id=dev, time=t,
                                          metrics={"inference": inference}).encode())  # fmt: skip
    ing.flush()


def test_labels_are_summed_per_device_and_version(home: Home) -> None:
    ingest(home,
           ("dev-a", T0 + 10, {"m@2": window(50, 10, 9), "m@1": window(5, 4, 0)}),
           ("dev-a", T0 + 20, {"m@2": window(0, 30, 21)}),  # labels arriving after the calls
           ("dev-b", T0 + 20, {"m@2": window(40)}))  # fmt: skip
    h = telemetry.version_health(home.coordinator.registry, name="m", version="2", since=T0,
                                 now=T0 + 1000)  # fmt: skip
    assert (h["dev-a"].count, h["dev-a"].labelled, h["dev-a"].accuracy) == (50, 40, 30 / 40)
    assert (h["dev-b"].labelled, h["dev-b"].accuracy) == (0, None)  # no labels: no accuracy
    assert h["dev-a"].to_dict()["accuracy"] == 0.75
    old = telemetry.version_health(home.coordinator.registry, name="m", version="1", since=T0,
                                   now=T0 + 1000)  # fmt: skip
    assert old["dev-a"].accuracy == 0.0


@pytest.mark.parametrize(("labelled", "correct", "accuracy"), [
    (-3, 1, None), ("5", 1, None), (True, 1, None), (4, 9, 1.0), (4, -1, 0.0), (4, 2.5, 0.0),
])  # fmt: skip
def test_malformed_label_counts_are_not_trusted(home: Home, labelled: Any, correct: Any,
                                                accuracy: float | None) -> None:  # fmt: skip
    ingest(home, ("dev-a", T0 + 10, {"m@2": window(10, labelled, correct)}))
    h = telemetry.version_health(home.coordinator.registry, name="m", version="2", since=T0,
                                 now=T0 + 1000)  # fmt: skip
    assert h["dev-a"].accuracy == accuracy


def test_the_rollout_evidence_carries_accuracy_and_labels(home: Home) -> None:
    ingest(home, ("dev-a", T0 + 10, {"m@2": window(60, 25, 20)}))
    spec = RolloutSpec(name="m", version="2", canary=Stage.parse("device:dev-a"),
                       waves=(Stage.parse("100%"),), gates=(Gate.parse("accuracy>0.9"),),
                       bake=0)  # fmt: skip
    state = RolloutState(phase="baking", wave=0, wave_devices=("dev-a",), released=("dev-a",),
                         previous={"dev-a": "1"}, sequence=3, since=T0)  # fmt: skip
    r = Rollout(id=1, spec=spec, state=state, revision=1, created=T0, updated=T0)
    ev = TelemetryEvidence()(home.coordinator.registry, r, T0 + 1000)
    cand = ev.candidate["dev-a"]
    assert (cand.count, cand.labelled, cand.accuracy) == (60, 25, 0.8)
