"""Fleet drift from stored telemetry: reports through the real ingest, views per version, group
and device, alerts raised once per device and version, malformed reports dropped."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from edgefleet.coordinator import drift
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.ingest import TELEMETRY, Ingest
from edgefleet.protocol.messages import Telemetry
from edgefleet.simulations.homes import provision_fleet

NOW = 1_900_000_000
DEVICES = ["d0", "d1", "d2", "d3"]


def _report(psi: list[float], n: float = 500.0, out: float | None = 0.01) -> dict[str, Any]:
    return {"n": n, "psi": psi, "ks": [p / 4 for p in psi], "max_psi": max(psi),
            "max_ks": max(psi) / 4, "output_psi": out, "nonfinite": 0}  # fmt: skip


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Coordinator:
    homes = provision_fleet(tmp_path_factory.mktemp("drift"), DEVICES)
    c = homes.coordinator
    c.registry.add_to_group("canary", ["d0", "d1"])
    return c


def _ingest(c: Coordinator, reports: dict[str, dict[str, Any]], t: int) -> None:
    ing = Ingest(c.registry, clock=lambda: t)
    for device, metrics in reports.items():
        payload = Telemetry(device_id=device, time=t, metrics={"drift": metrics}).encode()
        assert ing.add(device, TELEMETRY, payload)
    ing.flush()


def test_views_alerts_and_bad_reports(coordinator: Coordinator) -> None:
    calm = [0.01, 0.02, 0.03]
    _ingest(coordinator, {
        "d0": {"digits@1": _report([0.01, 1.4, 0.6])},   # drifts on features 1 and 2
        "d1": {"digits@1": _report(calm)},
        "d2": {"digits@1": _report([0.9, 0.0, 0.0], n=20)},  # too few samples to count
        "d3": {"digits@1": _report(calm, out=0.5),         # the outputs shifted
               "digits@bad": {"n": "x"}, "no-at-sign": _report(calm)},
    }, NOW - 60)  # fmt: skip
    _ingest(coordinator, {"d1": {"digits@1": _report([0.02, 0.01, 0.05])}}, NOW - 10)  # newer
    rows = drift.latest(coordinator.registry, since=NOW - 3600)
    assert [(r.device_id, r.version) for r in rows] == [
        ("d0", "1"), ("d1", "1"), ("d2", "1"), ("d3", "1")]
    d1 = next(r for r in rows if r.device_id == "d1")
    assert d1.max_psi == 0.05  # the newest report wins
    d0 = rows[0]
    assert d0.features[0] == (1, 1.4, 0.35) and d0.top(0.2) == [[1, 1.4, 0.35], [2, 0.6, 0.15]]

    agg = {(a.scope, a.key): a for a in drift.view(rows, coordinator.registry.groups())}
    v = agg[("version", "digits@1")]
    assert (v.devices, v.drifting, v.max_score) == (3, 2, 1.4)  # d2 is left out (20 rows)
    assert dict(v.features) == {1: 1, 2: 1}
    g = agg[("group", "canary digits@1")]
    assert (g.devices, g.drifting) == (2, 1)
    assert agg[("device", "d3")].max_score == 0.5 and ("device", "d2") not in agg

    new = drift.check(coordinator.registry, now=NOW)
    assert sorted((a.device_id, a.name, a.version) for a in new) == [
        ("d0", "digits", "1"), ("d3", "digits", "1")]
    a0 = next(a for a in new if a.device_id == "d0")
    assert a0.features == [[1, 1.4, 0.35], [2, 0.6, 0.15]] and a0.samples == 500
    assert a0.score == 1.4 and a0.state == "open"
    assert drift.check(coordinator.registry, now=NOW) == []  # open already: not raised twice
    assert drift.mark_handled(coordinator.registry, [a.id for a in new], "run-1") == 2
    handled = drift.alerts(coordinator.registry, state="handled")
    assert {a.run_id for a in handled} == {"run-1"}
    again = drift.check(coordinator.registry, now=NOW)  # still drifting after handling: anew
    assert len(again) == 2
    assert drift.check(coordinator.registry, now=NOW + 7200) == []  # reports aged out


@pytest.mark.parametrize(("key", "report"), [
    ("digits@1", {"n": -1, "psi": [0.1], "ks": [0.1]}),
    ("digits@1", {"n": 10, "psi": [0.1, 0.2], "ks": [0.1]}),
    ("digits@1", {"n": 10, "psi": [], "ks": []}),
    ("digits@1", {"n": 10, "psi": [float("nan")], "ks": [0.1]}),
    ("digits@1", {"n": 10, "psi": [True], "ks": [0.1]}),
    ("digits@1", {"n": 10, "psi": [0.1], "ks": [0.1], "features": [-1]}),
    ("digits@1", {"n": 10, "psi": [0.1], "ks": [0.1], "output_psi": "high"}),
    ("digits@1", {"n": 10, "psi": [0.1] * 1025, "ks": [0.1] * 1025}),
    ("../x@1", {"n": 10, "psi": [0.1], "ks": [0.1]}),
    ("digits@1@2", {"n": 10, "psi": [0.1], "ks": [0.1]}),
    ("digits@1", [0.1]),
])  # fmt: skip
def test_malformed_reports_are_dropped(key: str, report: Any) -> None:
    assert drift.parse_report("d0", NOW, key, report) is None


def test_a_report_of_the_top_features_keeps_their_indexes() -> None:
    r = drift.parse_report("d0", NOW, "m@2", {"n": 300, "psi": [0.3, 0.9], "ks": [0.1, 0.4],
                                              "features": [70, 12]})  # fmt: skip
    assert r is not None and r.features == ((12, 0.9, 0.4), (70, 0.3, 0.1))
    assert np.isclose(r.score, 0.9)


def test_the_cli_prints_the_view_and_records_alerts(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet import cli

    _ingest(coordinator, {"d1": {"digits@1": _report([0.01, 0.02, 0.9])}}, NOW)
    assert cli.main(["fleet", "drift", "--home", str(coordinator.home), "--name", "digits"]) == 0
    out = capsys.readouterr().out
    assert "digits@1" in out and "canary" in out and "alert" in out and "d1" in out
    assert cli.main(["fleet", "drift", "--home", str(coordinator.home), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert {a["scope"] for a in data["view"]} == {"version", "group", "device"}
    assert cli.main(["fleet", "drift", "--home", str(coordinator.home), "--threshold", "-1"]) == 1
    assert "threshold" in capsys.readouterr().err


def test_register_with_reference_data_puts_it_in_the_manifest(
    coordinator: Coordinator, digits_v1: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefleet import cli

    rng = np.random.default_rng(3)
    good, narrow = tmp_path / "ref.npz", tmp_path / "narrow.npz"
    np.savez(good, x=rng.uniform(0, 1, (300, 64)), y=rng.integers(0, 10, 300))
    np.savez(narrow, x=rng.uniform(0, 1, (300, 8)))
    args = ["model", "register", "--home", str(coordinator.home), "--name", "ref",
            "--file", str(digits_v1.onnx), "--meta", str(digits_v1.meta_path)]  # fmt: skip
    assert cli.main([*args, "--reference-data", str(good)]) == 0
    version = capsys.readouterr().out.strip()
    _, built = coordinator.build("ref", version, "device:d0")
    stats = built.manifest.reference_stats
    assert stats["n"] == 300 and len(stats["cuts"]) == 64 and len(stats["class_prior"]) == 10
    assert cli.main([*args, "--reference-data", str(narrow)]) == 1
    assert "8 features for an input of 64" in capsys.readouterr().err
    assert cli.main([*args, "--reference-data", str(tmp_path / "missing.npz")]) == 1
