"""``simulations.fl``: a small federation on the in-memory broker learns, is released and
served, and its report (CSV; PNG only if matplotlib is installed) is written."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from edgefleet.simulations.fl import FlSimConfig, run_fl, write_report

from edgefleet.cli import main


def test_a_small_federation_learns_and_serves_its_model(tmp_path: Path) -> None:
    cfg = FlSimConfig(agents=3, rounds=4, alpha=0.5)
    result = run_fl(tmp_path / "work", cfg)
    assert len(result.accuracy) == 4
    assert result.accuracy[-1] > result.accuracy[0]
    assert result.accuracy[-1] >= 0.9 * result.centralized  # looser than the 5-agent bar
    assert result.outcome.released_version == result.records[-1].version
    assert sorted(result.served) == ["fl-0", "fl-1", "fl-2"]
    written = write_report(result, tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "accuracy.csv").open()))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["accuracy"]) for r in rows] == [round(a, 4) for a in result.accuracy]
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert ((tmp_path / "out" / "accuracy.png") in written) == has_plot


def test_sim_fl_command(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["sim", "fl", "--agents", "2", "--rounds", "2", "--local-epochs", "2",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("round ")] == ["1/2", "2/2"]
    assert f"wrote {tmp_path / 'accuracy.csv'}" in out and "served by 2 agents" in out
