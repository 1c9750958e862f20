"""``python -m bench --quick`` runs end to end and writes the expected metrics.

No timing assertions: performance figures are reported by ``make bench`` as ratios against
baselines measured in the same run, never checked here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# minutes even with --quick: run by `make bench` only (fl: a fleet on mosquitto; shadow: two
# candidate installs and ~1.5 s of timed calls per arm on top of the shared fleet, ~90 s here)
SLOW = {"fl", "fleet", "shadow", "console", "drift", "telemetry", "rollout"}
SLOW |= {"rollout"}  # 10-15 s with --quick on this loaded box (registry set-up, enrolling)

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("sklearn")
pytest.importorskip("sqlalchemy")

EXPECTED = {
    "bundle": ["open_mb_s", "crypto_mb_s", "floor_mb_s", "install_ms:onnx", "install_ms:tflite"],
    "predict": [f"{k}:{fmt}" for fmt in ("onnx", "tflite")
                for k in ("p50_us", "p99_us", "overhead_ns")],
    "rss": ["rss_mb:onnx", "rss_mb:tflite", "sklearn_imported:onnx", "sklearn_imported:tflite"],
}


@pytest.mark.timeout(120)
def test_quick_bench_writes_results(tmp_path: Path) -> None:
    from bench import discover

    out = tmp_path / "results"
    names = [n for n in discover() if n not in SLOW]
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), *names],
                          cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "latest.json").read_text())
    assert (out / "latest.md").read_text().startswith("# EdgeFleet benchmarks")
    assert doc["quick"] is True
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cryptography"] != "absent"
    assert set(EXPECTED) <= set(doc["benchmarks"])
    for name, keys in EXPECTED.items():
        bench = doc["benchmarks"][name]
        assert "error" not in bench, bench.get("error")
        rows = {r["key"]: r for r in bench["rows"]}
        for key in keys:
            assert key in rows, f"{name}: no row {key!r} (have {sorted(rows)})"
            row = rows[key]
            assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"])
            if row["baseline_value"] is not None:  # ratio = ours / baseline, as documented
                assert row["baseline_value"] > 0
                assert row["ratio"] == pytest.approx(row["value"] / row["baseline_value"])
    # a functional property, not a timing: the agent path never imports scikit-learn
    rss = {r["key"]: r for r in doc["benchmarks"]["rss"]["rows"]}
    assert rss["sklearn_imported:onnx"]["value"] == 0
    assert rss["sklearn_imported:tflite"]["value"] == 0


def test_bench_rejects_unknown_names(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--out", str(tmp_path), "nosuch"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr
    assert not (tmp_path / "latest.json").exists()
