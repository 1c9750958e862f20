"""``simulations.fl``: a small federation on the in-memory broker learns, is released and
served, and its report is written: a CSV and a PNG plot (accuracy per round; with DP, accuracy
against ε beside it), or the CSV and a one-line note when matplotlib is missing."""

from __future__ import annotations

import csv
import importlib.util
import struct
import sys
from pathlib import Path

import pytest
from edgefleet.federated.runs import RoundRecord, RunResult
from edgefleet.federated.service import FlOutcome
from edgefleet.simulations.fl import FlSimConfig, FlSimResult, run_fl, write_report

from edgefleet.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


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
    assert {r["epsilon"] for r in rows} == {""}  # no DP
    png = tmp_path / "out" / "accuracy.png"
    if importlib.util.find_spec("matplotlib") is None:  # the plots extra is not installed
        assert written == [tmp_path / "out" / "accuracy.csv"]
        return
    assert written == [tmp_path / "out" / "accuracy.csv", png]
    assert png_size(png) == (600, 400)  # one panel, 6 x 4 in at 100 dpi
    assert 10_000 < png.stat().st_size < 200_000


def _dp_result(rounds: int = 3) -> FlSimResult:
    """A report's input as a DP run leaves it (the numbers are made up)."""
    records = tuple(
        RoundRecord(round=r, version=str(r), parent=str(r - 1) if r > 1 else None,
                    lineage={"fl": {"dp": {"epsilon": 2.0 * r, "delta": 1e-5,
                                           "noise_multiplier": 1.0, "clipping_norm": 5.0}}})
        for r in range(1, rounds + 1)
    )  # fmt: skip
    result = RunResult(run_id="sim", rounds=records, weights={}, version=str(rounds))
    outcome = FlOutcome(result=result, released=None, released_version=None, release_note="",
                        round_seconds=(1.0,) * rounds)  # fmt: skip
    return FlSimResult(centralized=0.97, accuracy=(0.2, 0.3, 0.35)[:rounds], records=records,
                       outcome=outcome, served={}, agents=3)  # fmt: skip


def test_with_dp_the_plot_has_accuracy_against_epsilon(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = write_report(_dp_result(), tmp_path)
    assert png_size(tmp_path / "accuracy.png") == (1000, 400)  # two panels
    assert len(written) == 2
    rows = list(csv.DictReader((tmp_path / "accuracy.csv").open()))
    assert [r["epsilon"] for r in rows] == ["2.0000", "4.0000", "6.0000"]


def test_without_matplotlib_the_csv_is_written_and_no_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert write_report(_dp_result(), tmp_path) == [tmp_path / "accuracy.csv"]
    assert not (tmp_path / "accuracy.png").exists()


@pytest.mark.slow  # the DP path is also run through fl start in tests/test_cli_fl.py
def test_sim_fl_command_with_dp(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the note path; the plot is above
    code = main(["sim", "fl", "--agents", "2", "--rounds", "2", "--local-epochs", "2",
                 "--dp-noise", "1", "--dp-clip", "5", "--out", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    rounds = [ln for ln in out.splitlines() if ln.startswith("round ")]
    assert [ln.split()[1] for ln in rounds] == ["1/2", "2/2"]
    assert all(" eps=" in ln for ln in rounds), rounds
    assert f"wrote {tmp_path / 'accuracy.csv'}" in out and "served by 2 agents" in out
    assert "; eps " in out.splitlines()[-1]
    assert captured.err.strip().splitlines()[-1] == (
        "note: no plot: matplotlib is not installed (pip install 'edgefleet[plots]')")
    eps = [float(r["epsilon"]) for r in csv.DictReader((tmp_path / "accuracy.csv").open())]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]


def test_bad_dp_flags_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "fl", "--dp-noise", "1"]) == 1
    assert capsys.readouterr().err.strip() == (
        "edgefleet: differential privacy needs both a noise multiplier and a clip")
